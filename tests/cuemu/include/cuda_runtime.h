/* cuda_runtime.h for the CPU emulation of CUDA: everything is in cuemu.h. */
#include "../cuemu.h"
