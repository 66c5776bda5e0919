#!/usr/bin/python3
"""torch_model.py: a straightforward PyTorch implementation of the moerl model (DeepSeek-V3 family, written from
/work/shared/docs/MODEL-SPEC.md), timed for `moerl bench model --torch`.

Same computation as moerl's training step (model/model.h): embedding, pre-norm blocks of MLA (with or without
q_lora, decoupled interleaved RoPE with YaRN, mscale^2 softmax scale, causal mask) and a dense SwiGLU or a
DeepSeekMoE FFN (sigmoid + bias group-limited top-k or the V2 softmax gates, shared experts), final norm, head,
the MTP modules (embedding first, post-final-norm hidden state, shared head), and
loss = CE_main + (lambda/D) * sum_k CE_mtp_k + alpha * sum_layers L_bal.

Deliberately plain, not tricked out: fp32, autograd for the backward, full T x T attention scores with a causal
mask, and the MoE as a Python loop over experts with index_select + matmul + index_add_. No torch.compile, no fused
kernels, no custom autograd.

Usage: python3 bench/torch_model.py --config CONFIG.json --tokens T --threads N --steps S
                                    [--mtp-weight L] [--balance-alpha A] [--seed N]
Prints ONE JSON line on stdout: {"torch": version, "threads": N, "tokens": T, "steps": S, "fwd_s": median forward
seconds, "step_s": median forward+backward seconds, "loss": first loss}; or {"skipped": reason} when torch cannot
be imported (exit status 0 then, so the caller reports it instead of failing).
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch_common  # noqa: E402 (next to this script)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--balance-alpha", type=float, default=None, help="default: the config's aux_loss_alpha")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        import torch  # noqa: F401
    except Exception as ex:  # ImportError, or a broken install
        print(json.dumps({"skipped": "python3 cannot import torch (%s: %s); install python3-torch"
                          % (type(ex).__name__, ex)}))
        return 0
    with open(args.config) as f:
        cfg = json.load(f)
    out = run(cfg, args)
    print(json.dumps(out))
    return 0


def run(cfg, args):
    import torch
    import torch.nn.functional as F

    torch_common.setup(torch, args.threads, args.seed)
    torch.set_default_dtype(torch.float32)

    c = torch_common.config_dims(cfg)
    get = c.get
    V, d, L, H, I, Ie = c.V, c.d, c.L, c.H, c.I, c.Ie
    E, K, Ns, G, Gtop = c.E, c.K, c.Ns, c.G, c.Gtop
    scoring, method, norm_topk, rsf, k_dense, freq = c.scoring, c.method, c.norm_topk, c.rsf, c.k_dense, c.freq
    rq, rkv, dn, dr, dv, dqk, eps = c.rq, c.rkv, c.dn, c.dr, c.dv, c.dqk, c.eps
    D = get("num_nextn_predict_layers", 0)
    alpha = args.balance_alpha if args.balance_alpha is not None else float(get("aux_loss_alpha", 0.001))
    lam = args.mtp_weight
    T = args.tokens
    std = 0.006  # MODEL-SPEC 9.5

    # ---- RoPE frequencies (5.4) and softmax scale (5.5)
    inv, scale = torch_common.rope_freqs(torch, c)
    pos = torch.arange(T, dtype=torch.float32)
    ang = torch.outer(pos, inv)  # (T, dr/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(x, n):
        """Interleaved pairs (2i, 2i+1) rotated by angle p * w_i; x (..., n, dr) over the first n positions."""
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, s_ = cos[:n], sin[:n]
        while c.dim() < x0.dim():
            c, s_ = c.unsqueeze(-2), s_.unsqueeze(-2)
        c, s_ = c.expand_as(x0), s_.expand_as(x0)
        return torch.stack((x0 * c - x1 * s_, x0 * s_ + x1 * c), dim=-1).flatten(-2)

    # ---- parameters
    params = []

    def P(*shape, ones=False):
        t = torch.ones(*shape) if ones else torch.randn(*shape) * std
        t.requires_grad_(True)
        params.append(t)
        return t

    def is_moe(layer):
        return E > 0 and layer >= k_dense and layer % freq == 0

    def make_block(layer):
        b = {"attn_norm": P(d, ones=True), "ffn_norm": P(d, ones=True)}
        if rq:
            b["q_a"], b["q_a_norm"], b["q_b"] = P(rq, d), P(rq, ones=True), P(H * dqk, rq)
        else:
            b["q"] = P(H * dqk, d)
        b["kv_a"], b["kv_a_norm"], b["kv_b"] = P(rkv + dr, d), P(rkv, ones=True), P(H * (dn + dv), rkv)
        b["o"] = P(d, H * dv)
        b["moe"] = is_moe(layer)
        if b["moe"]:
            b["router"] = P(E, d)
            b["bias"] = torch.zeros(E)  # e_score_correction_bias: a buffer, no gradient
            b["eg"] = [P(Ie, d) for _ in range(E)]
            b["eu"] = [P(Ie, d) for _ in range(E)]
            b["ed"] = [P(d, Ie) for _ in range(E)]
            if Ns:
                b["sg"], b["su"], b["sd"] = P(Ns * Ie, d), P(Ns * Ie, d), P(d, Ns * Ie)
        else:
            b["g"], b["u"], b["dn"] = P(I, d), P(I, d), P(d, I)
        return b

    embed = P(V, d)
    blocks = [make_block(layer) for layer in range(L)]
    final_norm = P(d, ones=True)
    head = P(V, d)
    mtp = []
    for k in range(D):
        mtp.append({"enorm": P(d, ones=True), "hnorm": P(d, ones=True), "eh": P(d, 2 * d),
                    "head_norm": P(d, ones=True), "block": make_block(L + k)})

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def swiglu(x, g, u, dw):
        return (F.silu(x @ g.t()) * (x @ u.t())) @ dw.t()

    causal = torch.full((T, T), float("-inf")).triu(1)

    def mla(b, a):
        n = a.shape[0]
        if rq:
            q = rmsnorm(a @ b["q_a"].t(), b["q_a_norm"]) @ b["q_b"].t()
        else:
            q = a @ b["q"].t()
        q = q.view(n, H, dqk)
        q = torch.cat((q[..., :dn], rope(q[..., dn:], n)), dim=-1)
        kv = a @ b["kv_a"].t()
        c = rmsnorm(kv[:, :rkv], b["kv_a_norm"])
        kpe = rope(kv[:, rkv:], n)  # (n, dr), shared by the heads
        kvb = (c @ b["kv_b"].t()).view(n, H, dn + dv)
        k = torch.cat((kvb[..., :dn], kpe.unsqueeze(1).expand(n, H, dr)), dim=-1)
        v = kvb[..., dn:]
        s_ = torch.matmul(q.transpose(0, 1), k.transpose(0, 1).transpose(1, 2)) * scale  # (H, n, n)
        p = torch.softmax(s_ + causal[:n, :n], dim=-1)
        o = torch.matmul(p, v.transpose(0, 1)).transpose(0, 1).reshape(n, H * dv)
        return o @ b["o"].t()

    def route(b, f):
        """Returns (idx (n, K), weights (n, K), affinities (n, E)); MODEL-SPEC 7.1 / 7.3."""
        z = f @ b["router"].t()
        s_ = torch.sigmoid(z) if scoring == "sigmoid" else torch.softmax(z, dim=-1)
        with torch.no_grad():
            sel = s_ + b["bias"] if method == "noaux_tc" else s_.clone()
            n = f.shape[0]
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
        return idx, w * rsf, s_

    def moe(b, f):
        n = f.shape[0]
        idx, w, s_ = route(b, f)
        out = torch.zeros_like(f)
        for e in range(E):  # per-expert index_select + matmul
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            xe = f.index_select(0, tok)
            ye = swiglu(xe, b["eg"][e], b["eu"][e], b["ed"][e])
            out = out.index_add(0, tok, ye * w[tok, slot].unsqueeze(1))
        if Ns:
            out = out + swiglu(f, b["sg"], b["su"], b["sd"])
        # 9.2 balance loss over the single sequence of n tokens: f_i constant, P_i from normalized affinities
        with torch.no_grad():
            cnt = torch.zeros(E).index_add_(0, idx.reshape(-1), torch.ones(n * K))
            fi = cnt * (E / (K * n))
        bal = (fi * (s_ / s_.sum(-1, keepdim=True)).mean(0)).sum()
        return out, bal

    def block(b, x):
        x = x + mla(b, rmsnorm(x, b["attn_norm"]))
        f = rmsnorm(x, b["ffn_norm"])
        if b["moe"]:
            y, bal = moe(b, f)
            return x + y, bal
        return x + swiglu(f, b["g"], b["u"], b["dn"]), None

    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, V, (T,), generator=gen)
    targets = torch.cat((ids[1:], torch.tensor([-1])))

    def forward():
        x = embed[ids]
        bal_sum = 0.0
        for b in blocks:
            x, bal = block(b, x)
            if bal is not None and alpha > 0:
                bal_sum = bal_sum + alpha * bal
        h = rmsnorm(x, final_norm)
        loss = F.cross_entropy(h @ head.t(), targets, ignore_index=-1) + bal_sum
        if lam > 0:
            hprev = h
            for k in range(1, D + 1):
                n = T - k
                if n < 1:
                    break
                m = mtp[k - 1]
                cat = torch.cat((rmsnorm(embed[ids[k:]], m["enorm"]), rmsnorm(hprev[:n], m["hnorm"])), dim=-1)
                hk, _ = block(m["block"], cat @ m["eh"].t())  # MTP balance loss not counted (model.h)
                logits = rmsnorm(hk, m["head_norm"]) @ head.t()
                loss = loss + (lam / D) * F.cross_entropy(logits, targets[k:], ignore_index=-1)
                hprev = hk
        return loss

    fwd_t, step_t, first_loss = [], [], None
    for it in range(args.steps + 1):  # step 0 warms up
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if first_loss is None:
            first_loss = float(loss)
        if it > 0:
            fwd_t.append(t1 - t0)
            step_t.append(t2 - t0)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "tokens": T, "steps": args.steps,
            "fwd_s": statistics.median(fwd_t), "step_s": statistics.median(step_t), "loss": first_loss,
            "params": sum(p.numel() for p in params)}


if __name__ == "__main__":
    sys.exit(main())
