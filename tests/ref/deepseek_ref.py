#!/usr/bin/python3
"""Independent PyTorch reference of the DeepSeek-V3 family forward pass, written from
/work/shared/docs/MODEL-SPEC.md (sections 2-10 and 13) without looking at moerl's C code and without
`transformers`. It builds tiny random checkpoints in Hugging Face format (config.json + safetensors,
HF tensor names of MODEL-SPEC 10.3), runs the forward pass in float64 from the exact stored weight values
(bf16 / f16 / fp8-dequantized / f32) and writes golden fixtures under tests/fixtures/golden/<case>/.

Run with Debian's python (python3-torch, python3-numpy):
    /usr/bin/python3 tests/ref/deepseek_ref.py            # (re)write every case
    /usr/bin/python3 tests/ref/deepseek_ref.py --verify   # regenerate in memory, compare with the files
See tests/ref/README.md for the cases, the file formats and the spec ambiguities.
"""
import argparse
import json
import math
import os
import struct
import sys
from collections import OrderedDict

import numpy as np
import torch

torch.set_default_dtype(torch.float64)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "golden")
T_TOKENS = 11

# ----------------------------------------------------------------------------------------------
# Storage dtypes (MODEL-SPEC 10.4, 10.5)
# ----------------------------------------------------------------------------------------------

DTYPE_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}


def f32_to_bf16_bits(a):
    """fp32 -> bf16 with round-to-nearest-even on the low 16 bits (inputs are finite)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    assert np.all(np.isfinite(np.asarray(a, dtype=np.float32)))
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f64(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def fp8_e4m3fn_value(q):
    """Decode one byte exactly as MODEL-SPEC 10.4 states."""
    s = -1.0 if (q >> 7) else 1.0
    ex = (q >> 3) & 0xF
    mn = q & 7
    if ex == 0:
        return s * 2.0 ** -6 * (mn / 8.0)
    if ex == 15 and mn == 7:
        return float("nan")
    return s * 2.0 ** (ex - 7) * (1.0 + mn / 8.0)


FP8_TABLE = np.array([fp8_e4m3fn_value(q) for q in range(256)], dtype=np.float64)
FP8_POS = FP8_TABLE[:127]  # codes 0x00..0x7E: every finite non-negative value, increasing


def fp8_encode(x):
    """float64 array with |x| <= 448 -> E4M3fn codes, round to nearest, ties to the even code."""
    x = np.asarray(x, dtype=np.float64)
    ax = np.abs(x)
    assert np.all(ax <= 448.0)
    hi = np.clip(np.searchsorted(FP8_POS, ax, side="left"), 0, 126)
    lo = np.clip(hi - 1, 0, 126)
    dlo = ax - FP8_POS[lo]
    dhi = FP8_POS[hi] - ax
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code = np.where(np.signbit(x), code | 0x80, code).astype(np.uint8)
    return code


def fp8_quantize_blocks(w):
    """128x128 block quantization: scale = amax/448 (fp32) per block, code = fp8(w/scale).
    Returns (codes uint8 [out,in], scale f32 [ceil(out/128), ceil(in/128)])."""
    out, inn = w.shape
    nbr, nbc = (out + 127) // 128, (inn + 127) // 128
    scale = np.zeros((nbr, nbc), dtype=np.float32)
    codes = np.zeros((out, inn), dtype=np.uint8)
    for br in range(nbr):
        for bc in range(nbc):
            blk = w[br * 128:(br + 1) * 128, bc * 128:(bc + 1) * 128]
            sc = np.float32(np.abs(blk).max() / 448.0)
            scale[br, bc] = sc
            y = blk / np.float64(sc)
            y = np.clip(y, -448.0, 448.0)  # rounding of sc can push amax/sc a hair above 448
            codes[br * 128:(br + 1) * 128, bc * 128:(bc + 1) * 128] = fp8_encode(y)
    return codes, scale


def fp8_dequant(codes, scale):
    """MODEL-SPEC 10.4: W[r][c] = fp8(q[r][c]) * S[r//128][c//128] (exact, no bf16 rounding)."""
    rows = np.arange(codes.shape[0]) // 128
    cols = np.arange(codes.shape[1]) // 128
    return FP8_TABLE[codes] * scale.astype(np.float64)[rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------------------------
# Checkpoint building (values as stored) and safetensors writing (MODEL-SPEC 10.1, 10.2)
# ----------------------------------------------------------------------------------------------

LINEAR_SUFFIXES = ("q_a_proj.weight", "q_b_proj.weight", "q_proj.weight", "kv_a_proj_with_mqa.weight",
                   "kv_b_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
                   "down_proj.weight")


class Checkpoint:
    """name -> (dtype string, shape, raw little-endian bytes) plus the decoded float64 value."""

    def __init__(self, policy):
        self.policy = policy  # "BF16", "F16", "F32" or "FP8" (FP8 linears, BF16 rest, F32 bias/scales)
        self.raw = OrderedDict()
        self.val = {}

    def _put(self, name, dtype, shape, data):
        assert name not in self.raw, name
        assert len(data) == int(np.prod(shape)) * DTYPE_SIZE[dtype]
        self.raw[name] = (dtype, list(shape), data)

    def add(self, name, w):
        w = np.asarray(w, dtype=np.float64)
        is_bias = name.endswith("e_score_correction_bias")
        is_linear = name.endswith(LINEAR_SUFFIXES) and ".mlp.gate." not in name
        pol = self.policy
        if is_bias or pol == "F32":
            a = w.astype("<f4")
            self._put(name, "F32", w.shape, a.tobytes())
            v = a.astype(np.float64)
        elif pol == "F16":
            a = w.astype("<f2")
            self._put(name, "F16", w.shape, a.tobytes())
            v = a.astype(np.float64)
        elif pol == "FP8" and is_linear:
            codes, scale = fp8_quantize_blocks(w)
            self._put(name, "F8_E4M3", w.shape, codes.tobytes())
            self._put(name + "_scale_inv", "F32", scale.shape, scale.astype("<f4").tobytes())
            v = fp8_dequant(codes, scale)
        else:  # BF16 (also the non-linear tensors of the FP8 policy)
            bits = f32_to_bf16_bits(w.astype(np.float32))
            self._put(name, "BF16", w.shape, bits.astype("<u2").tobytes())
            v = bf16_bits_to_f64(bits)
        self.val[name] = torch.from_numpy(v.reshape(w.shape).copy())

    def copy(self, dst, src):
        dtype, shape, data = self.raw[src]
        self._put(dst, dtype, shape, data)
        self.val[dst] = self.val[src].clone()

    def total_bytes(self, names=None):
        return sum(len(self.raw[n][2]) for n in (names if names is not None else self.raw))


def safetensors_bytes(raw, names):
    """Tensors ordered by element size (largest first) then name, so every tensor is aligned as in
    files written by the safetensors library; header padded with spaces to a multiple of 8."""
    order = sorted(names, key=lambda n: (-DTYPE_SIZE[raw[n][0]], n))
    header = OrderedDict()
    header["__metadata__"] = {"format": "pt"}
    off = 0
    for n in order:
        dtype, shape, data = raw[n]
        header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)
    return struct.pack("<Q", len(hj)) + hj + b"".join(raw[n][2] for n in order)


# ----------------------------------------------------------------------------------------------
# The model (MODEL-SPEC 2-9), float64
# ----------------------------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    """MODEL-SPEC 4: y = w * x / sqrt(mean(x^2) + eps)."""
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def silu(x):
    return x / (1.0 + torch.exp(-x))


def rope_kind(cfg):
    rs = cfg.get("rope_scaling")
    if not rs:
        return None
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ValueError("only YaRN rope_scaling is specified, got %r" % kind)
    return rs


def yarn_inv_freq(D, base, rs):
    """MODEL-SPEC 5.4 steps 1-4. rs = rope_scaling dict or None (plain RoPE)."""
    i = torch.arange(D // 2, dtype=torch.float64)
    theta = base ** (-2.0 * i / D)
    if rs is None:
        return theta
    s = float(rs["factor"])
    L0 = float(rs["original_max_position_embeddings"])
    bf = float(rs.get("beta_fast", 32))
    bs = float(rs.get("beta_slow", 1))

    def cd(r):
        return D * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(base))

    low = max(math.floor(cd(bf)), 0)
    high = min(math.ceil(cd(bs)), D - 1)
    if low == high:
        high += 0.001
    r = torch.clamp((i - low) / (high - low), 0.0, 1.0)
    return theta * (1 - r) + (theta / s) * r


def softmax_scale(cfg):
    """MODEL-SPEC 5.5: lambda = d_qk^-1/2 * m^2, m = 0.1*mscale_all_dim*ln(factor) + 1."""
    d_qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    lam = d_qk ** -0.5
    rs = rope_kind(cfg)
    if rs is not None and float(rs["factor"]) > 1 and rs.get("mscale_all_dim"):
        m = 0.1 * float(rs["mscale_all_dim"]) * math.log(float(rs["factor"])) + 1.0
        lam *= m * m
    return lam


def rope_interleaved(x, pos, omega):
    """x [..., T, D]: pairs (2i, 2i+1) rotated by phi = p * omega_i (checkpoint layout, MODEL-SPEC 5.4)."""
    phi = pos[:, None] * omega[None, :]
    c, s = torch.cos(phi), torch.sin(phi)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def rope_hf(x, pos, omega):
    """HF path of MODEL-SPEC 5.4: permute to half-split, rotate-half with cat(phi, phi)."""
    D = x.shape[-1]
    perm = [2 * j for j in range(D // 2)] + [2 * j + 1 for j in range(D // 2)]
    xp = x[..., perm]
    phi = pos[:, None] * omega[None, :]
    emb = torch.cat([phi, phi], dim=-1)
    rot = torch.cat([-xp[..., D // 2:], xp[..., :D // 2]], dim=-1)
    return xp * torch.cos(emb) + rot * torch.sin(emb)


class Model:
    def __init__(self, cfg, W, dtype=torch.float64):
        """dtype float64 makes the goldens; float32 only measures how far an fp32 pipeline lands."""
        self.cfg = cfg
        self.dtype = dtype
        self.W = None if W is None else {k: v.to(dtype) for k, v in W.items()}
        self.eps = float(cfg["rms_norm_eps"])
        self.omega = yarn_inv_freq(cfg["qk_rope_head_dim"], float(cfg["rope_theta"]), rope_kind(cfg)).to(dtype)
        self.lam = softmax_scale(cfg)
        self.routing = []  # (layer, per-token records)
        self.self_check_max = {"rope_hf_vs_interleaved": 0.0, "absorbed_vs_naive": 0.0}

    def is_moe(self, layer):
        c = self.cfg
        return bool(c.get("n_routed_experts")) and layer >= c["first_k_dense_replace"] and \
            layer % c.get("moe_layer_freq", 1) == 0

    # --- MLA (MODEL-SPEC 5.1-5.5; 5.6 absorbed form as a self-check) ---
    def mla(self, a, p, pos):
        c, W = self.cfg, self.W
        T = a.shape[0]
        H, dn, dr, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        rkv = c["kv_lora_rank"]
        if c.get("q_lora_rank"):
            cq = rmsnorm(a @ W[p + "self_attn.q_a_proj.weight"].T, W[p + "self_attn.q_a_layernorm.weight"], self.eps)
            q = cq @ W[p + "self_attn.q_b_proj.weight"].T
        else:
            q = a @ W[p + "self_attn.q_proj.weight"].T
        q = q.view(T, H, dn + dr).transpose(0, 1)  # [H, T, dqk]
        q_nope, q_pe_raw = q[..., :dn], q[..., dn:]
        kv = a @ W[p + "self_attn.kv_a_proj_with_mqa.weight"].T
        lat, k_pe_raw = kv[:, :rkv], kv[:, rkv:]
        cn = rmsnorm(lat, W[p + "self_attn.kv_a_layernorm.weight"], self.eps)  # latent only
        wkvb = W[p + "self_attn.kv_b_proj.weight"].view(H, dn + dv, rkv)
        w_uk, w_uv = wkvb[:, :dn, :], wkvb[:, dn:, :]
        k_nope = torch.einsum("hec,uc->hue", w_uk, cn)  # [H, T, dn]
        v = torch.einsum("hec,uc->hue", w_uv, cn)  # [H, T, dv]
        q_pe = rope_interleaved(q_pe_raw, pos, self.omega)
        k_pe = rope_interleaved(k_pe_raw, pos, self.omega)  # [T, dr], shared by all heads
        mask = pos[None, :] > pos[:, None]  # [t, u]: key after query

        def attend(scores):  # causal mask, softmax over keys
            return torch.softmax(scores.masked_fill(mask[None], float("-inf")), dim=-1)

        scores = self.lam * (q_nope @ k_nope.transpose(1, 2) + q_pe @ k_pe.T)
        P = attend(scores)
        o = P @ v  # [H, T, dv]
        out = o.transpose(0, 1).reshape(T, H * dv) @ W[p + "self_attn.o_proj.weight"].T

        # self-check 1: HF's permuted half-split RoPE gives identical scores
        s_hf = self.lam * (q_nope @ k_nope.transpose(1, 2) +
                           rope_hf(q_pe_raw, pos, self.omega) @ rope_hf(k_pe_raw, pos, self.omega).T)
        d1 = (s_hf - scores).abs().max().item()
        # self-check 2: absorbed latent form (MODEL-SPEC 5.6)
        q_t = torch.einsum("hte,hec->htc", q_nope, w_uk)
        s_abs = self.lam * (q_t @ cn.T + q_pe @ k_pe.T)
        P2 = attend(s_abs)
        z = P2 @ cn  # [H, T, rkv]
        o2 = torch.einsum("htc,hec->hte", z, w_uv)
        out2 = o2.transpose(0, 1).reshape(T, H * dv) @ W[p + "self_attn.o_proj.weight"].T
        d2 = (out2 - out).abs().max().item() / max(out.abs().max().item(), 1e-30)
        self.self_check_max["rope_hf_vs_interleaved"] = max(self.self_check_max["rope_hf_vs_interleaved"], d1)
        self.self_check_max["absorbed_vs_naive"] = max(self.self_check_max["absorbed_vs_naive"], d2)
        return out

    # --- SwiGLU MLP (MODEL-SPEC 6) ---
    def mlp(self, x, pre):
        W = self.W
        g = x @ W[pre + "gate_proj.weight"].T
        u = x @ W[pre + "up_proj.weight"].T
        return (silu(g) * u) @ W[pre + "down_proj.weight"].T

    # --- router (MODEL-SPEC 7.1, 7.3) ---
    def route(self, f, p, layer):
        c, W = self.cfg, self.W
        K = c["num_experts_per_tok"]
        method, scoring = c["topk_method"], c["scoring_func"]
        z = f @ W[p + "mlp.gate.weight"].T  # [T, E]
        if scoring == "sigmoid":
            s = torch.sigmoid(z)
        elif scoring == "softmax":
            s = torch.softmax(z, dim=-1)
        else:
            raise ValueError(scoring)
        if method == "noaux_tc":
            assert scoring == "sigmoid"
            bias = W[p + "mlp.gate.e_score_correction_bias"]
            sel = s + bias[None, :]
            G, Gtop, rule = c["n_group"], c["topk_group"], "top2sum"
        elif method == "group_limited_greedy":
            bias = None
            sel = s
            G, Gtop, rule = c["n_group"], c["topk_group"], "max"
        elif method == "greedy":
            bias = None
            sel = s
            G, Gtop, rule = 1, 1, "max"
        else:
            raise ValueError(method)
        recs = []
        for t in range(f.shape[0]):
            sv = sel[t].tolist()
            S, gm, em = select(sv, G, Gtop, K, rule, fill=float("-inf"))
            S0, _, _ = select(sv, G, Gtop, K, rule, fill=0.0)  # HF's 0.0 fill (MODEL-SPEC 13)
            Sng, _, _ = select(sv, 1, 1, K, rule, fill=float("-inf"))  # no group limit
            Snb = None
            if bias is not None:
                Snb, _, _ = select(s[t].tolist(), G, Gtop, K, rule, fill=float("-inf"))
            g = s[t, S]
            if c.get("norm_topk_prob") and (scoring == "sigmoid" or K > 1):
                g = g / g.sum()
            g = g * float(c.get("routed_scaling_factor", 1.0))
            recs.append({"experts": S, "weights": g, "affinity": s[t], "group_margin": gm, "expert_margin": em,
                         "zero_fill_differs": sorted(S0) != sorted(S),
                         "group_limit_matters": sorted(Sng) != sorted(S),
                         "bias_matters": Snb is not None and sorted(Snb) != sorted(S)})
        self.routing.append((layer, recs))
        return recs

    def moe(self, f, p, layer):
        c = self.cfg
        recs = self.route(f, p, layer)
        y = torch.zeros_like(f)
        for t, r in enumerate(recs):
            for e, g in zip(r["experts"], r["weights"]):
                y[t] += g * self.mlp(f[t:t + 1], p + "mlp.experts.%d." % e)[0]
        if c.get("n_shared_experts"):
            y = y + self.mlp(f, p + "mlp.shared_experts.")
        return y

    # --- one pre-norm block (MODEL-SPEC 2) ---
    def block(self, x, layer, pos):
        p = "model.layers.%d." % layer
        a = rmsnorm(x, self.W[p + "input_layernorm.weight"], self.eps)
        x = x + self.mla(a, p, pos)
        f = rmsnorm(x, self.W[p + "post_attention_layernorm.weight"], self.eps)
        x = x + (self.moe(f, p, layer) if self.is_moe(layer) else self.mlp(f, p + "mlp."))
        return x

    def forward(self, ids):
        c, W = self.cfg, self.W
        T = len(ids)
        L = c["num_hidden_layers"]
        pos = torch.arange(T, dtype=self.dtype)
        idt = torch.tensor(ids)
        x = W["model.embed_tokens.weight"][idt]
        hidden = [x]
        for layer in range(L):
            x = self.block(x, layer, pos)
            hidden.append(x)
        h = rmsnorm(x, W["model.norm.weight"], self.eps)
        hidden.append(h)
        logits = h @ W["lm_head.weight"].T
        # MTP (MODEL-SPEC 9.4): h^0 = final-normed hidden; embedding first in the concat
        mtp = []
        hprev = h
        for k in range(1, c.get("num_nextn_predict_layers", 0) + 1):
            layer = L + k - 1
            p = "model.layers.%d." % layer
            n = T - k
            e = W[p + "embed_tokens.weight"][idt[k:k + n]]  # Emb(t_{i+k}), i = 0..n-1
            cat = torch.cat([rmsnorm(e, W[p + "enorm.weight"], self.eps),
                             rmsnorm(hprev[:n], W[p + "hnorm.weight"], self.eps)], dim=-1)
            xk = cat @ W[p + "eh_proj.weight"].T
            xk = self.block(xk, layer, pos[:n])  # row i at position i
            lk = rmsnorm(xk, W[p + "shared_head.norm.weight"], self.eps) @ W[p + "shared_head.head.weight"].T
            mtp.append(lk)
            hprev = xk  # un-normed output feeds depth k+1
        return logits, mtp, hidden


def select(sv, G, Gtop, K, rule, fill):
    """Group-limited top-k on the list sv (selection scores). Ties: lower group / expert index wins.
    Returns (experts in selection order, relative group margin, relative expert margin)."""
    E = len(sv)
    assert E % G == 0
    gs = E // G
    kept = set(range(G))
    gmargin = float("inf")
    if G > 1:
        gsc = []
        for g in range(G):
            vals = sorted(sv[g * gs:(g + 1) * gs], reverse=True)
            gsc.append(vals[0] + vals[1] if rule == "top2sum" else vals[0])
        order = sorted(range(G), key=lambda g: (-gsc[g], g))
        kept = set(order[:Gtop])
        if Gtop < G:
            gmargin = rel_gap(gsc[order[Gtop - 1]], gsc[order[Gtop]])
    masked = [sv[i] if i // gs in kept else fill for i in range(E)]
    order = sorted(range(E), key=lambda i: (-masked[i], i))
    S = order[:K]
    emargin = float("inf")
    if K < E and masked[order[K]] != float("-inf"):
        emargin = rel_gap(masked[order[K - 1]], masked[order[K]])
    return S, gmargin, emargin


def rel_gap(a, b):
    return (a - b) / max(0.5 * (abs(a) + abs(b)), 1e-12)


def xent(logits, targets):
    lp = torch.log_softmax(logits, dim=-1)
    return -lp[torch.arange(len(targets)), torch.tensor(targets)]


# ----------------------------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------------------------

def build_checkpoint(cfg, policy, rng, bias_shift):
    """bias_shift: {layer: offset added to that layer's e_score_correction_bias} (all-negative layers)."""
    ck = Checkpoint(policy)
    d, V = cfg["hidden_size"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    rq, rkv = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
    L, D = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers", 0)

    def lin(name, out, inn, gain=1.0):
        ck.add(name, rng.standard_normal((out, inn)) * (gain / math.sqrt(inn)))

    def norm(name, n):
        ck.add(name, 1.0 + 0.1 * rng.standard_normal(n))

    ck.add("model.embed_tokens.weight", 0.5 * rng.standard_normal((V, d)))
    lin("lm_head.weight", V, d)
    norm("model.norm.weight", d)
    model = Model(cfg, None)
    for layer in range(L + D):
        p = "model.layers.%d." % layer
        if layer >= L:  # MTP module extras (MODEL-SPEC 9.4 storage); embedding/head are copies
            ck.copy(p + "embed_tokens.weight", "model.embed_tokens.weight")
            ck.copy(p + "shared_head.head.weight", "lm_head.weight")
            norm(p + "enorm.weight", d)
            norm(p + "hnorm.weight", d)
            norm(p + "shared_head.norm.weight", d)
            lin(p + "eh_proj.weight", d, 2 * d)
        norm(p + "input_layernorm.weight", d)
        norm(p + "post_attention_layernorm.weight", d)
        a = p + "self_attn."
        if rq:
            lin(a + "q_a_proj.weight", rq, d)
            norm(a + "q_a_layernorm.weight", rq)
            lin(a + "q_b_proj.weight", H * (dn + dr), rq)
        else:
            lin(a + "q_proj.weight", H * (dn + dr), d)
        lin(a + "kv_a_proj_with_mqa.weight", rkv + dr, d)
        norm(a + "kv_a_layernorm.weight", rkv)
        lin(a + "kv_b_proj.weight", H * (dn + dv), rkv)
        lin(a + "o_proj.weight", d, H * dv)
        if model.is_moe(layer):
            E, Ie = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
            lin(p + "mlp.gate.weight", E, d, gain=1.5)
            if cfg["topk_method"] == "noaux_tc":
                ck.add(p + "mlp.gate.e_score_correction_bias",
                       rng.uniform(-0.25, 0.25, E) + bias_shift.get(layer, 0.0))
            for e in range(E):
                q = p + "mlp.experts.%d." % e
                lin(q + "gate_proj.weight", Ie, d)
                lin(q + "up_proj.weight", Ie, d)
                lin(q + "down_proj.weight", d, Ie)
            if cfg.get("n_shared_experts"):
                Is = cfg["n_shared_experts"] * Ie
                q = p + "mlp.shared_experts."
                lin(q + "gate_proj.weight", Is, d)
                lin(q + "up_proj.weight", Is, d)
                lin(q + "down_proj.weight", d, Is)
        else:
            I = cfg["intermediate_size"]
            lin(p + "mlp.gate_proj.weight", I, d)
            lin(p + "mlp.up_proj.weight", I, d)
            lin(p + "mlp.down_proj.weight", d, I)
    return ck


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

def base_config(model_type):
    cfg = OrderedDict()
    cfg["architectures"] = ["DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
    cfg["model_type"] = model_type
    cfg["vocab_size"] = 97
    cfg["bos_token_id"] = 0
    cfg["eos_token_id"] = 1
    cfg["rms_norm_eps"] = 1e-6
    cfg["hidden_act"] = "silu"
    cfg["tie_word_embeddings"] = False
    cfg["initializer_range"] = 0.02
    cfg["attention_bias"] = False
    cfg["attention_dropout"] = 0.0
    cfg["rope_theta"] = 10000
    cfg["moe_layer_freq"] = 1
    cfg["aux_loss_alpha"] = 0.001
    cfg["seq_aux"] = True
    cfg["ep_size"] = 1
    cfg["pretraining_tp"] = 1
    cfg["use_cache"] = True
    return cfg


def case_v3_full():
    c = base_config("deepseek_v3")
    c.update(hidden_size=64, intermediate_size=96, moe_intermediate_size=8, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=16,
             num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
             norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=48,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24,
             rope_scaling=OrderedDict(type="yarn", factor=4, original_max_position_embeddings=8, beta_fast=32,
                                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
             max_position_embeddings=32, num_nextn_predict_layers=2, torch_dtype="bfloat16")
    return dict(name="v3_full", cfg=c, policy="BF16", seed=1000, bias_shift={2: -1.3}, shards=1,
                require=("bias_matters", "group_limit_matters", "zero_fill_differs", "yarn_matters"),
                desc="V3: q_lora_rank, 4 groups of 4 experts (keep 2, top-2 sum), YaRN factor 4 over 8 "
                     "positions with mscale 0.707, 1 dense + 2 MoE layers, 2 shared experts, MTP depth 2 "
                     "(model.layers.3, model.layers.4), BF16. Layer 2's correction bias is all negative.")


def case_v3_no_qlora():
    c = base_config("deepseek_v3")
    c.update(hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=8,
             num_experts_per_tok=2, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
             norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=None,
             kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, rope_scaling=None,
             max_position_embeddings=64, num_nextn_predict_layers=0, torch_dtype="float32")
    return dict(name="v3_no_qlora", cfg=c, policy="F32", seed=2000, bias_shift={}, shards=1,
                require=("bias_matters",),
                desc="V3 sigmoid/noaux_tc with one group, q_lora_rank null (q_proj), plain RoPE (no "
                     "rope_scaling: lambda = d_qk^-1/2), no MTP, F32 weights, one file.")


def case_v3_fp8_sharded():
    c = base_config("deepseek_v3")
    c.update(hidden_size=160, intermediate_size=136, moe_intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4,
             num_experts_per_tok=2, n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
             norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=40,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             rope_scaling=OrderedDict(rope_type="yarn", factor=8, original_max_position_embeddings=64,
                                      beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
             max_position_embeddings=512, num_nextn_predict_layers=1, torch_dtype="bfloat16",
             quantization_config=OrderedDict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                             weight_block_size=[128, 128]))
    return dict(name="v3_fp8_sharded", cfg=c, policy="FP8", seed=3000, bias_shift={}, shards=3,
                require=("group_limit_matters", "yarn_matters"),
                desc="V3 FP8 release format: F8_E4M3 linears + F32 weight_scale_inv 128x128 blocks with partial "
                     "edge blocks (hidden 160, dense width 136), BF16 rest, 3 shards + index, rope_scaling "
                     "spelled rope_type with a fractional YaRN ramp, MTP depth 1 (model.layers.2).")


def case_v2_gate():
    c = base_config("deepseek_v2")
    c.update(hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, n_shared_experts=2, n_routed_experts=8,
             num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="group_limited_greedy",
             scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0, first_k_dense_replace=1,
             q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
             rope_scaling=None, max_position_embeddings=64, torch_dtype="float16")
    return dict(name="v2_gate", cfg=c, policy="F16", seed=4000, bias_shift={}, shards=1,
                require=("group_limit_matters",),
                desc="V2 softmax gate, group_limited_greedy top-3 (group score = max, 4 groups of 2, keep 2), "
                     "norm_topk_prob false, routed_scaling_factor 16, q_lora_rank null, no rope_scaling, F16.")


def case_v2_greedy():
    c = base_config("deepseek_v2")
    c.update(hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, n_shared_experts=None, n_routed_experts=8,
             num_experts_per_tok=3, n_group=1, topk_group=1, topk_method="greedy",
             scoring_func="softmax", norm_topk_prob=True, routed_scaling_factor=1.0, first_k_dense_replace=1,
             q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
             rope_scaling=OrderedDict(type="yarn", factor=4, original_max_position_embeddings=8, beta_fast=32,
                                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
             max_position_embeddings=32, torch_dtype="float16")
    return dict(name="v2_greedy", cfg=c, policy="F16", seed=5000, bias_shift={}, shards=1,
                require=("yarn_matters",),
                desc="V2 softmax gate, greedy top-3, norm_topk_prob true (renormalized softmax weights), no "
                     "shared experts (n_shared_experts null), YaRN with mscale 0.707 (V2-Lite style; lambda "
                     "includes m^2 per MODEL-SPEC 5.5), q_lora_rank null, F16.")


CASES = [case_v3_full, case_v3_no_qlora, case_v3_fp8_sharded, case_v2_gate, case_v2_greedy]
MARGIN_MIN = 5e-4  # relative gap required at every routing decision (fp32 noise is ~1e-6)


def run_case(case):
    cfg = case["cfg"]
    for seed in range(case["seed"], case["seed"] + 500):
        rng = np.random.default_rng(seed)
        ck = build_checkpoint(cfg, case["policy"], rng, case["bias_shift"])
        ids = [0] + [int(v) for v in rng.integers(2, cfg["vocab_size"], T_TOKENS - 1)]
        m = Model(cfg, ck.val)
        logits, mtp, hidden = m.forward(ids)
        recs = [r for _, rs in m.routing for r in rs]
        mg = min([min(r["group_margin"], r["expert_margin"]) for r in recs] + [float("inf")])
        stats = {k: sum(1 for r in recs if r[k]) for k in ("bias_matters", "group_limit_matters",
                                                           "zero_fill_differs")}
        yarn = 0.0
        if rope_kind(cfg) is not None:  # how much the YaRN frequencies change the logits
            c2 = dict(cfg)
            c2["rope_scaling"] = None
            m2 = Model(c2, ck.val)
            m2.lam = m.lam  # same softmax scale, only the frequencies differ
            yarn = (m2.forward(ids)[0] - logits).abs().max().item()
        stats["yarn_matters"] = yarn
        ok = mg >= MARGIN_MIN and all(stats[k] for k in case["require"])
        if ok:
            return dict(seed=seed, ck=ck, ids=ids, model=m, logits=logits, mtp=mtp, hidden=hidden,
                        margin=mg, stats=stats)
    raise RuntimeError("%s: no seed with clear routing margins" % case["name"])


def shard_of(name, n_shards, cfg):
    """Spread tensors over shards like the release: layer-wise, a layer can straddle two shards, and one
    FP8 weight has its scale in the next shard."""
    if n_shards == 1:
        return 0
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        if layer == 0:
            return 0
        if layer == cfg["num_hidden_layers"] - 1:
            if ".mlp.experts." in name:
                e = int(name.split(".")[5])
                if e == 1 and name.endswith("down_proj.weight_scale_inv"):
                    return 2
                return 1 if e <= 1 else 2
            return 1
        return 2
    return 0 if name == "model.embed_tokens.weight" else 2


def f32_bytes(t):
    return np.ascontiguousarray(t.detach().numpy(), dtype="<f4").tobytes()


def fmt(v):
    return "%.9g" % v


def case_files(case, res):
    """Returns OrderedDict relative file name -> bytes."""
    cfg, ck, ids = case["cfg"], res["ck"], res["ids"]
    T, V = len(ids), cfg["vocab_size"]
    files = OrderedDict()
    files["config.json"] = (json.dumps(cfg, indent=2) + "\n").encode()
    names = list(ck.raw)
    if case["shards"] == 1:
        files["model.safetensors"] = safetensors_bytes(ck.raw, names)
    else:
        n = case["shards"]
        fname = ["model-%05d-of-%05d.safetensors" % (i + 1, n) for i in range(n)]
        parts = [[] for _ in range(n)]
        wmap = OrderedDict()
        for nm in sorted(names):
            s = shard_of(nm, n, cfg)
            parts[s].append(nm)
            wmap[nm] = fname[s]
        for i in range(n):
            assert parts[i]
            files[fname[i]] = safetensors_bytes(ck.raw, parts[i])
        index = OrderedDict(metadata={"total_size": ck.total_bytes()}, weight_map=wmap)
        files["model.safetensors.index.json"] = (json.dumps(index, indent=2) + "\n").encode()
    files["ids.txt"] = (" ".join(str(i) for i in ids) + "\n").encode()
    files["logits.f32"] = f32_bytes(res["logits"])
    if res["mtp"]:
        files["mtp_logits.f32"] = b"".join(f32_bytes(x) for x in res["mtp"])
    files["hidden.f32"] = b"".join(f32_bytes(h) for h in res["hidden"])

    # losses
    main = xent(res["logits"][:T - 1], ids[1:])
    lines = ["# natural-log cross-entropy. main: logits row i vs ids[i+1], i = 0..T-2.",
             "# mtpK: depth-K logits row i vs ids[i+K+1], i = 0..T-K-2 (the last row of each depth has no target).",
             "# '<name> <mean>' then '<name>_per_pos <one value per target position>'.",
             "main %s" % fmt(main.mean().item()),
             "main_per_pos " + " ".join(fmt(v) for v in main.tolist())]
    losses = {"main": main.mean().item()}
    for k, lk in enumerate(res["mtp"], start=1):
        tg = ids[k + 1:]
        lv = xent(lk[:len(tg)], tg)
        lines.append("mtp%d %s" % (k, fmt(lv.mean().item())))
        lines.append("mtp%d_per_pos " % k + " ".join(fmt(v) for v in lv.tolist()))
        losses["mtp%d" % k] = lv.mean().item()
    # complementary sequence-wise balance term of MODEL-SPEC 9.2, without alpha, per MoE layer
    lines.append("# balance_fP <layer> <sum_i f_i*P_i>: f_i = E/(K*T) * #tokens whose actual (biased, group-limited)")
    lines.append("# selection contains i; P_i = mean_t s_it/sum_j s_jt; multiply by alpha yourself (1.0 = balanced).")
    E, K = cfg.get("n_routed_experts"), cfg.get("num_experts_per_tok")
    for layer, recs in res["model"].routing:
        n = len(recs)
        cnt = torch.zeros(E)
        P = torch.zeros(E)
        for r in recs:
            cnt[r["experts"]] += 1.0
            P += r["affinity"] / r["affinity"].sum()
        val = ((E / (K * n)) * cnt * (P / n)).sum().item()
        lines.append("balance_fP %d %s" % (layer, fmt(val)))
        losses["balance_fP_layer%d" % layer] = val
    files["loss.txt"] = ("\n".join(lines) + "\n").encode()

    # routing
    lines = ["# one line per (MoE layer, token): experts in ascending index order and their final weights",
             "# (after norm_topk_prob and routed_scaling_factor). MTP layers are numbered num_hidden_layers+k-1",
             "# and have T-k tokens. min relative routing margin over all decisions: %s" % fmt(res["margin"])]
    for layer, recs in res["model"].routing:
        for t, r in enumerate(recs):
            pairs = sorted(zip(r["experts"], r["weights"].tolist()))
            lines.append("layer %d token %d experts %s weights %s" % (
                layer, t, " ".join(str(e) for e, _ in pairs), " ".join(fmt(w) for _, w in pairs)))
    files["routing.txt"] = ("\n".join(lines) + "\n").encode()

    extra = OrderedDict()
    if case["policy"] == "FP8":
        nm = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
        files["dequant_check.f32"] = np.ascontiguousarray(ck.val[nm].numpy(), dtype="<f4").tobytes()
        codes = np.concatenate([np.frombuffer(ck.raw[n][2], dtype=np.uint8)
                                for n in ck.raw if ck.raw[n][0] == "F8_E4M3"])
        extra["dequant_check"] = {"tensor": nm, "shape": list(ck.val[nm].shape)}
        extra["fp8_codes"] = {"subnormal_nonzero": int(np.sum(((codes & 0x78) == 0) & ((codes & 7) != 0))),
                              "zero": int(np.sum((codes & 0x7F) == 0)),
                              "max_448": int(np.sum((codes & 0x7F) == 0x7E))}
    m = res["model"]
    meta = OrderedDict()
    meta["case"] = case["name"]
    meta["description"] = case["desc"]
    meta["seed"] = res["seed"]
    meta["generator"] = "tests/ref/deepseek_ref.py (float64 forward from the stored weight values)"
    meta["torch_version"] = torch.__version__
    meta["numpy_version"] = np.__version__
    meta["python_version"] = sys.version.split()[0]
    meta["T"] = T
    meta["ids"] = ids
    meta["weight_storage"] = case["policy"]
    meta["softmax_scale"] = m.lam
    meta["rope_inv_freq"] = m.omega.tolist()
    meta["moe_layers"] = [layer for layer, _ in m.routing]
    meta["mtp_depths"] = len(res["mtp"])
    meta["files"] = OrderedDict([
        ("logits.f32", [T, V]),
        ("mtp_logits.f32", [[T - k, V] for k in range(1, len(res["mtp"]) + 1)]),
        ("hidden.f32", [cfg["num_hidden_layers"] + 2, T, cfg["hidden_size"]])])
    meta["losses"] = losses
    meta["routing_min_relative_margin"] = res["margin"]
    meta["routing_token_counts"] = OrderedDict(
        (k, res["stats"][k]) for k in ("bias_matters", "group_limit_matters", "zero_fill_differs"))
    meta["yarn_max_logit_change"] = res["stats"]["yarn_matters"]
    meta["self_check_max"] = m.self_check_max
    meta.update(extra)
    files["meta.json"] = (json.dumps(meta, indent=2) + "\n").encode()
    return files


def parse_safetensors(data):
    """Independent reader used to check what was written: returns name -> (dtype, shape, bytes)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n].decode("utf-8"))
    assert header.pop("__metadata__") == {"format": "pt"}
    body = data[8 + n:]
    out = {}
    end_max = 0
    for name, h in header.items():
        b, e = h["data_offsets"]
        assert 0 <= b <= e <= len(body) and e - b == int(np.prod(h["shape"])) * DTYPE_SIZE[h["dtype"]], name
        assert b % DTYPE_SIZE[h["dtype"]] == 0, name
        out[name] = (h["dtype"], h["shape"], body[b:e])
        end_max = max(end_max, e)
    assert end_max == len(body)
    return out


def load_weights(files):
    """Decode the written checkpoint (single file or index + shards) back to float64 tensors."""
    if "model.safetensors.index.json" in files:
        index = json.loads(files["model.safetensors.index.json"])
        shards = {fn: parse_safetensors(files[fn]) for fn in sorted(set(index["weight_map"].values()))}
        raw = {name: shards[fn][name] for name, fn in index["weight_map"].items()}
        assert sum(len(v[2]) for v in raw.values()) == index["metadata"]["total_size"]
        assert sum(len(sh) for sh in shards.values()) == len(raw)
    else:
        raw = parse_safetensors(files["model.safetensors"])
    W = {}
    for name, (dtype, shape, data) in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if dtype == "F32":
            v = np.frombuffer(data, dtype="<f4").astype(np.float64)
        elif dtype == "F16":
            v = np.frombuffer(data, dtype="<f2").astype(np.float64)
        elif dtype == "BF16":
            v = bf16_bits_to_f64(np.frombuffer(data, dtype="<u2"))
        elif dtype == "F8_E4M3":
            sd, sshape, sdata = raw[name + "_scale_inv"]
            assert sd == "F32" and sshape == [(shape[0] + 127) // 128, (shape[1] + 127) // 128], name
            v = fp8_dequant(np.frombuffer(data, dtype=np.uint8).reshape(shape),
                            np.frombuffer(sdata, dtype="<f4").reshape(sshape))
        else:
            raise ValueError(dtype)
        W[name] = torch.from_numpy(np.array(v, dtype=np.float64).reshape(shape))
    return W


def check_files(files, ids):
    """Reload config + weights from the bytes about to be written and recompute: logits must match."""
    cfg = json.loads(files["config.json"])
    W = load_weights(files)
    logits, mtp, _ = Model(cfg, W).forward(ids)
    assert f32_bytes(logits) == files["logits.f32"], "reloaded logits differ"
    if mtp:
        assert b"".join(f32_bytes(x) for x in mtp) == files["mtp_logits.f32"], "reloaded MTP logits differ"
    assert files["ids.txt"].decode().split() == [str(i) for i in ids]


def fp32_distance(cfg, W, ids, logits, mtp, routing):
    """Run the same forward in float32 (what the C code does) and return the max relative logit
    difference to the float64 goldens (relative to the largest |logit|); routing must be identical."""
    m = Model(cfg, W, dtype=torch.float32)
    l32, mtp32, _ = m.forward(ids)
    for (la, ra), (lb, rb) in zip(m.routing, routing):
        assert la == lb and [sorted(x["experts"]) for x in ra] == [sorted(x["experts"]) for x in rb], \
            "fp32 routing differs in layer %d" % la
    worst = 0.0
    for a, b in zip([l32] + mtp32, [logits] + mtp):
        worst = max(worst, ((a.double() - b).abs().max() / b.abs().max()).item())
    return worst


def spec_self_checks():
    """Formulas against the test values printed in MODEL-SPEC 5.4, 5.5 and 10.4."""
    want = [1, 0.749894209, 0.562341325, 0.421696503, 0.316227766, 0.237137371, 0.177827941, 0.133352143,
            0.1, 0.0749894209, 0.0562341325, 0.0390069266, 0.0268793601, 0.0183781462, 0.0124479559,
            0.00833450895, 0.0055, 0.00356199749, 0.0022493653, 0.00137051364, 0.000790569415,
            0.000414990398, 0.000177827941, 3.33380358e-05, 2.5e-05, 1.87473552e-05, 1.40585331e-05,
            1.05424126e-05, 7.90569415e-06, 5.92843426e-06, 4.44569853e-06, 3.33380358e-06]
    rs = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
              mscale=1.0, mscale_all_dim=1.0)
    got = yarn_inv_freq(64, 10000.0, rs).tolist()
    assert all(abs(g - w) <= 1e-8 * w for g, w in zip(got, want)), "YaRN test vector"
    v3 = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling=rs)
    assert abs(softmax_scale(v3) - 0.1352337789) < 1e-9, softmax_scale(v3)
    v2l = dict(v3, rope_scaling=dict(rs, mscale=0.707, mscale_all_dim=0.707))
    assert abs(softmax_scale(v2l) - 0.1147213868) < 1e-9, softmax_scale(v2l)
    assert FP8_TABLE[0x7E] == 448 and FP8_TABLE[0x08] == 2 ** -6 and FP8_TABLE[0x01] == 2 ** -9
    assert math.isnan(FP8_TABLE[0x7F]) and math.isnan(FP8_TABLE[0xFF]) and FP8_TABLE[0xFE] == -448
    assert all(fp8_encode(FP8_TABLE[:127])[i] == i for i in range(127))
    assert f32_to_bf16_bits(np.array([1.0 + 2 ** -8], dtype=np.float32))[0] == 0x3F80  # tie -> even
    assert f32_to_bf16_bits(np.array([1.0 + 3 * 2 ** -8], dtype=np.float32))[0] == 0x3F82


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="fixture root (default tests/fixtures/golden)")
    ap.add_argument("--case", action="append", help="only this case (repeatable)")
    ap.add_argument("--verify", action="store_true", help="compare with the files on disk, write nothing")
    args = ap.parse_args()
    spec_self_checks()
    total = 0
    bad = 0
    for mk in CASES:
        case = mk()
        if args.case and case["name"] not in args.case:
            continue
        res = run_case(case)
        m = res["model"]
        assert m.self_check_max["rope_hf_vs_interleaved"] < 1e-10, m.self_check_max
        assert m.self_check_max["absorbed_vs_naive"] < 1e-10, m.self_check_max
        files = case_files(case, res)
        check_files(files, res["ids"])
        f32d = fp32_distance(case["cfg"], res["ck"].val, res["ids"], res["logits"], res["mtp"], m.routing)
        assert f32d < 1e-5, f32d
        d = os.path.join(args.out, case["name"])
        size = sum(len(b) for b in files.values())
        total += size
        lg = res["logits"]
        print("%-15s seed %d  %7d bytes  logits std %.3f max|.| %.3f  main loss %.6f  %s" % (
            case["name"], res["seed"], size, lg.std().item(), lg.abs().max().item(),
            xent(lg[:-1], res["ids"][1:]).mean().item(),
            " ".join("mtp%d %.6f" % (k, xent(x[:len(res['ids']) - k - 1], res["ids"][k + 1:]).mean().item())
                     for k, x in enumerate(res["mtp"], start=1))))
        print("%15s routing: min rel margin %.2e, tokens where bias/group-limit/0-fill change the choice: "
              "%d/%d/%d, YaRN max logit change %.3g,\n%15s self-checks %.1e %.1e, fp32 forward max rel diff %.1e" % (
                  "", res["margin"], res["stats"]["bias_matters"], res["stats"]["group_limit_matters"],
                  res["stats"]["zero_fill_differs"], res["stats"]["yarn_matters"], "",
                  m.self_check_max["rope_hf_vs_interleaved"], m.self_check_max["absorbed_vs_naive"], f32d))
        if args.verify:
            for fn, data in files.items():
                path = os.path.join(d, fn)
                if not os.path.exists(path) or open(path, "rb").read() != data:
                    print("  DIFFERS: %s" % path)
                    bad += 1
        else:
            os.makedirs(d, exist_ok=True)
            for fn in os.listdir(d):
                if fn not in files:
                    os.remove(os.path.join(d, fn))
            for fn, data in files.items():
                with open(os.path.join(d, fn), "wb") as fh:
                    fh.write(data)
    print("total fixture bytes: %d" % total)
    if args.verify:
        print("verify: %s" % ("OK" if bad == 0 else "%d file(s) differ" % bad))
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
