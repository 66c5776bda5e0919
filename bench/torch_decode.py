#!/usr/bin/python3
"""torch_decode.py: a straightforward PyTorch decode with a KV cache for the moerl model (DeepSeek-V3 family), the
same-run reference of bench/bench_rollout.c.

Same model as bench/torch_model.py (same config.json, same init scale, same plain style: fp32, torch.no_grad, the
MoE as a Python loop over experts with index_select + matmul + index_add_), in inference form:
  - KV cache: the FULL per-head K and V of every layer (what HF's DeepseekV3 attention caches: k = [k_nope, k_pe],
    v, after W_kv_b), preallocated per layer as (B, H, cap, d_qk) and (B, H, cap, d_v) and written in place (a
    static cache; no torch.cat per step). Not MLA's latent form, not the absorbed decode.
  - prefill: B prompts of P tokens, in chunks of at most --chunk prompts, one (n, P) batched causal forward per
    chunk; logits over every position (as moerl's model_prefill computes them).
  - decode: one warm-up step, then the best of 2 rounds of N steps of the B sequences, one token each per step,
    attention over the cached positions (as bench_rollout does for moerl).
The tokens fed are set ids (no sampling), other ones every step as in bench_rollout (the MoE routes them to other
experts): the figures are the model's throughput.

Usage: /usr/bin/python3 bench/torch_decode.py --config CONFIG.json --threads N [--batches 1,16,128] [--prompt 32]
                                             [--new 16] [--chunk 16] [--seed 0]
Prints ONE JSON line: {"torch": version, "threads": N, "cache": "...", "prompt": P, "new": N,
"results": [{"batch": B, "prefill_tps": ..., "decode_tps": ...}, ...]}; or {"skipped": reason} when torch cannot be
imported (exit status 0 then, so the caller reports it).
"""
import argparse
import json
import math
import sys
import time

import torch_common  # noqa: E402 (next to this script)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=16, help="prompts per prefill forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="instead of timing: max |logits| difference, cached decode vs one full forward (batch 2)")
    args = ap.parse_args()
    try:
        import torch  # noqa: F401
    except Exception as ex:  # ImportError, or a broken install
        print(json.dumps({"skipped": "python3 cannot import torch (%s: %s); install python3-torch"
                          % (type(ex).__name__, ex)}))
        return 0
    with open(args.config) as f:
        cfg = json.load(f)
    print(json.dumps(run(cfg, args)))
    return 0


def run(cfg, args):
    import torch
    import torch.nn.functional as F

    torch_common.setup(torch, args.threads, args.seed)
    torch.set_grad_enabled(False)

    c = torch_common.config_dims(cfg)
    get = c.get
    V, d, L, H, I, Ie = c.V, c.d, c.L, c.H, c.I, c.Ie
    E, K, Ns, G, Gtop = c.E, c.K, c.Ns, c.G, c.Gtop
    scoring, method, norm_topk, rsf, k_dense, freq = c.scoring, c.method, c.norm_topk, c.rsf, c.k_dense, c.freq
    rq, rkv, dn, dr, dv, dqk, eps = c.rq, c.rkv, c.dn, c.dr, c.dv, c.dqk, c.eps
    P, N = args.prompt, args.new
    cap = P + 2 * N + 1  # prompt, a warm-up step, 2 timed rounds of N
    std = 0.006  # MODEL-SPEC 9.5, as torch_model.py

    # ---- RoPE (5.4, interleaved pairs; YaRN frequencies) and softmax scale (5.5), as torch_model.py
    inv, scale = torch_common.rope_freqs(torch, c)
    ang = torch.outer(torch.arange(cap, dtype=torch.float32), inv)  # (cap, dr/2)
    cos_t, sin_t = ang.cos(), ang.sin()

    def rope(x, p0, n):
        """x (B, n, ..., dr) at positions p0 .. p0+n-1 (dim 1), interleaved pairs rotated."""
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, s_ = cos_t[p0:p0 + n], sin_t[p0:p0 + n]  # (n, dr/2)
        shape = [1, n] + [1] * (x0.dim() - 3) + [dr // 2]
        c, s_ = c.view(shape), s_.view(shape)
        return torch.stack((x0 * c - x1 * s_, x0 * s_ + x1 * c), dim=-1).flatten(-2)

    # ---- parameters (no MTP: decode does not run it)
    def R(*shape):
        return torch.randn(*shape) * std

    def is_moe(layer):
        return E > 0 and layer >= k_dense and layer % freq == 0

    def make_block(layer):
        b = {"attn_norm": torch.ones(d), "ffn_norm": torch.ones(d)}
        if rq:
            b["q_a"], b["q_a_norm"], b["q_b"] = R(rq, d), torch.ones(rq), R(H * dqk, rq)
        else:
            b["q"] = R(H * dqk, d)
        b["kv_a"], b["kv_a_norm"], b["kv_b"] = R(rkv + dr, d), torch.ones(rkv), R(H * (dn + dv), rkv)
        b["o"] = R(d, H * dv)
        b["moe"] = is_moe(layer)
        if b["moe"]:
            b["router"], b["bias"] = R(E, d), torch.zeros(E)
            b["eg"] = [R(Ie, d) for _ in range(E)]
            b["eu"] = [R(Ie, d) for _ in range(E)]
            b["ed"] = [R(d, Ie) for _ in range(E)]
            if Ns:
                b["sg"], b["su"], b["sd"] = R(Ns * Ie, d), R(Ns * Ie, d), R(d, Ns * Ie)
        else:
            b["g"], b["u"], b["dn"] = R(I, d), R(I, d), R(d, I)
        return b

    embed = R(V, d)
    blocks = [make_block(layer) for layer in range(L)]
    final_norm, head = torch.ones(d), R(V, d)

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def swiglu(x, g, u, dw):
        return (F.silu(x @ g.t()) * (x @ u.t())) @ dw.t()

    def mla(b, a, kc, vc, p0):
        """a (B, n, d) at positions p0..p0+n-1; appends k, v to the caches kc (B, H, cap, dqk), vc (B, H, cap, dv)."""
        Bn, n = a.shape[0], a.shape[1]
        q = rmsnorm(a @ b["q_a"].t(), b["q_a_norm"]) @ b["q_b"].t() if rq else a @ b["q"].t()
        q = q.view(Bn, n, H, dqk)
        q = torch.cat((q[..., :dn], rope(q[..., dn:], p0, n)), dim=-1)
        kv = a @ b["kv_a"].t()
        c = rmsnorm(kv[..., :rkv], b["kv_a_norm"])
        kpe = rope(kv[..., rkv:], p0, n)  # (B, n, dr), shared by the heads
        kvb = (c @ b["kv_b"].t()).view(Bn, n, H, dn + dv)
        k = torch.cat((kvb[..., :dn], kpe.unsqueeze(2).expand(Bn, n, H, dr)), dim=-1)
        kc[:, :, p0:p0 + n] = k.transpose(1, 2)
        vc[:, :, p0:p0 + n] = kvb[..., dn:].transpose(1, 2)
        t = p0 + n
        s_ = torch.matmul(q.transpose(1, 2), kc[:, :, :t].transpose(2, 3)) * scale  # (B, H, n, t)
        if n > 1:
            mask = torch.full((n, t), float("-inf")).triu(p0 + 1)
            s_ = s_ + mask
        o = torch.matmul(torch.softmax(s_, dim=-1), vc[:, :, :t])  # (B, H, n, dv)
        return o.transpose(1, 2).reshape(Bn, n, H * dv) @ b["o"].t()

    def moe(b, f):
        """f (T, d): sigmoid/softmax gates, group-limited top-k (MODEL-SPEC 7.1 / 7.3), loop over experts."""
        n = f.shape[0]
        z = f @ b["router"].t()
        s_ = torch.sigmoid(z) if scoring == "sigmoid" else torch.softmax(z, dim=-1)
        sel = s_ + b["bias"] if method == "noaux_tc" else s_.clone()
        if method != "greedy" and G > 1:
            grp = sel.view(n, G, E // G)
            gs = grp.topk(2, dim=-1).values.sum(-1) if method == "noaux_tc" else grp.max(-1).values
            keep = gs.topk(Gtop, dim=-1).indices
            mask = torch.ones(n, G, dtype=torch.bool)
            mask.scatter_(1, keep, False)
            sel = sel.masked_fill(mask.repeat_interleave(E // G, dim=1), float("-inf"))
        idx = sel.topk(K, dim=-1).indices
        w = s_.gather(1, idx)
        if norm_topk and (scoring == "sigmoid" or K > 1):
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * rsf
        out = torch.zeros_like(f)
        for e in range(E):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            ye = swiglu(f.index_select(0, tok), b["eg"][e], b["eu"][e], b["ed"][e])
            out.index_add_(0, tok, ye * w[tok, slot].unsqueeze(1))
        if Ns:
            out = out + swiglu(f, b["sg"], b["su"], b["sd"])
        return out

    def forward(ids, caches, p0):
        """ids (B, n) at positions p0..; returns logits (B, n, V)."""
        x = embed[ids]
        Bn, n = ids.shape
        for b, (kc, vc) in zip(blocks, caches):
            x = x + mla(b, rmsnorm(x, b["attn_norm"]), kc, vc, p0)
            f = rmsnorm(x, b["ffn_norm"])
            if b["moe"]:
                x = x + moe(b, f.reshape(Bn * n, d)).view(Bn, n, d)
            else:
                x = x + swiglu(f, b["g"], b["u"], b["dn"])
        return rmsnorm(x, final_norm) @ head.t()

    def new_caches(Bn):
        return [(torch.zeros(Bn, H, cap, dqk), torch.zeros(Bn, H, cap, dv)) for _ in range(L)]

    if args.check:  # the cache is right iff decoding token by token gives the full forward's logits
        B = 2
        seq = torch.tensor([[(bi * 131 + j * 31 + 7) % V for j in range(cap)] for bi in range(B)])
        full = forward(seq, new_caches(B), 0)
        caches = new_caches(B)
        inc = [forward(seq[:, :P], caches, 0)]
        for i in range(P, cap):
            inc.append(forward(seq[:, i:i + 1], caches, i))
        diff = (torch.cat(inc, dim=1) - full).abs().max().item()
        return {"check_maxdiff": diff, "logits_maxabs": full.abs().max().item()}

    results = []
    for B in [int(x) for x in args.batches.split(",") if x]:
        prompts = torch.tensor([[(bi * 131 + j * 31 + 7) % V for j in range(P)] for bi in range(B)])
        # prefill: chunks of at most args.chunk prompts, each into its own (chunk) cache; best of repetitions
        # while under ~1 s (one pass at least)
        chunks = []
        best, t_end = float("inf"), time.perf_counter() + 1.0
        while True:
            chunks = []
            t0 = time.perf_counter()
            for c0 in range(0, B, args.chunk):
                ch = prompts[c0:c0 + args.chunk]
                caches = new_caches(ch.shape[0])
                forward(ch, caches, 0)
                chunks.append(caches)
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() > t_end:
                break
        prefill_tps = B * P / best
        # the B sequences' caches as one batch (not timed: a static cache would be allocated at B from the start)
        caches = [(torch.cat([ch[l][0] for ch in chunks]), torch.cat([ch[l][1] for ch in chunks])) for l in range(L)]
        # step s feeds (b * 2654435761 + s * 40503 + 3) mod 2^32 mod V, as bench_rollout
        steps = [torch.tensor([((bi * 2654435761 + s * 40503 + 3) % 2**32) % V for bi in range(B)]).view(B, 1)
                 for s in range(2 * N + 1)]
        forward(steps[0], caches, P)  # warm-up step, not timed
        dbest = float("inf")
        for r in range(2):  # best of 2 rounds of N steps, as bench_rollout
            t0 = time.perf_counter()
            for i in range(N):
                forward(steps[1 + r * N + i], caches, P + 1 + r * N + i)
            dbest = min(dbest, time.perf_counter() - t0)
        decode_tps = B * N / dbest
        results.append({"batch": B, "prefill_tps": prefill_tps, "decode_tps": decode_tps})
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "prompt": P, "new": N,
            "cache": "full per-head K/V per layer (static, preallocated), fp32", "results": results}


if __name__ == "__main__":
    sys.exit(main())
