# translate.cmake: kernels/cuda/X.cu -> X.cpp for the CPU emulation (cmake -DIN=... -DOUT=... -P translate.cmake).
# Two rewrites, nothing else: `k<<<cfg>>>(` becomes `cuemu_launch(k, "k", cfg)(` and `extern __shared__ T a[];`
# becomes a pointer to the block's dynamic shared memory. #line keeps diagnostics on the .cu's lines.
file(READ "${IN}" src)
string(REGEX REPLACE "([A-Za-z_][A-Za-z_0-9]*)<<<([^;{}]*)>>>\\(" "cuemu_launch(\\1, \"\\1\", \\2)(" src "${src}")
string(REGEX REPLACE "extern __shared__ ([A-Za-z_][A-Za-z_0-9]*) ([A-Za-z_][A-Za-z_0-9]*)\\[\\];"
       "\\1 *\\2 = (\\1 *)cuemu_dyn_smem();" src "${src}")
if(src MATCHES "<<<|extern __shared__")
  message(FATAL_ERROR "${IN}: a launch or extern __shared__ declaration translate.cmake does not know how to rewrite")
endif()
file(WRITE "${OUT}.tmp" "#include \"cuemu.h\"\n#line 1 \"${IN}\"\n${src}")
file(RENAME "${OUT}.tmp" "${OUT}")
