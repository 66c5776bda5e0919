#!/usr/bin/python3
"""Independent PyTorch reference for kernels/cpu/moe.c: the DeepSeekMoE layer written the way HF transformers
writes it (DeepseekV3MoE / DeepseekV3TopkRouter for noaux_tc; the V2 remote-code MoEGate for softmax greedy and
group_limited_greedy), from MODEL-SPEC §6, §7. Differences from HF kept on purpose (MODEL-SPEC §13, moerl's rule):
discarded groups are masked with -inf, not 0.0.

Inputs are not random: every tensor element is a closed-form function of its flat index (see val()), which
tests/test_moe.c evaluates the same way, so no fixture file is needed. Prints the golden outputs and the chosen
experts as C initializers for tests/test_moe.c (paste into the golden_* tables). Run with Debian's python3-torch:
    /usr/bin/python3 tests/ref/moe_ref.py
"""
import math

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float32)


def val(n, phase, amp):
    """Element i of a tensor: amp * sin(0.7 * i + phase), computed in double, rounded to fp32."""
    return torch.tensor([amp * math.sin(0.7 * i + phase) for i in range(n)], dtype=torch.float64).float()


def make(cfg):
    T, d, E, Ie, Is = cfg["T"], cfg["d"], cfg["E"], cfg["I_e"], cfg["I_s"]
    w = {
        "x": val(T * d, 0.1, 1.0).view(T, d),
        "gate": val(E * d, 0.2, 0.8).view(E, d),
        "bias": val(E, 0.3, 0.1),
        "eg": val(E * Ie * d, 0.4, 0.5).view(E, Ie, d),
        "eu": val(E * Ie * d, 0.5, 0.5).view(E, Ie, d),
        "ed": val(E * d * Ie, 0.6, 0.5).view(E, d, Ie),
    }
    if Is:
        w["sg"] = val(Is * d, 0.7, 0.5).view(Is, d)
        w["su"] = val(Is * d, 0.8, 0.5).view(Is, d)
        w["sd"] = val(d * Is, 0.9, 0.5).view(d, Is)
    return w


def mlp(x, g, u, dn):
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), dn)


def route(cfg, w):
    T, E, K, G, Gt = cfg["T"], cfg["E"], cfg["K"], cfg["G"], cfg["topk_group"]
    logits = F.linear(w["x"], w["gate"])
    if cfg["score"] == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = logits.softmax(dim=-1, dtype=torch.float32)
    method = cfg["method"]
    if method == "noaux_tc":  # HF DeepseekV3TopkRouter.get_topk_indices
        choice = scores + w["bias"].unsqueeze(0)
        gs = choice.view(T, G, -1).topk(2, dim=-1)[0].sum(dim=-1)
    else:
        choice = scores
        gs = choice.view(T, G, -1).max(dim=-1).values
    if method != "greedy":
        gidx = torch.topk(gs, k=Gt, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
        smask = gmask.unsqueeze(-1).expand(T, G, E // G).reshape(T, -1)
        choice = choice.masked_fill(~smask.bool(), float("-inf"))
    top = torch.topk(choice, k=K, dim=-1, sorted=True)
    idx = top[1]
    # selection margin: K-th chosen minus best unchosen candidate (large = no near tie)
    srt = torch.sort(choice, dim=-1, descending=True).values
    margin = (srt[:, K - 1] - srt[:, K]).min().item() if K < E else float("inf")
    wts = scores.gather(1, idx)
    norm = cfg["norm"] and (method == "noaux_tc" or K > 1)
    if norm:
        wts = wts / (wts.sum(dim=-1, keepdim=True) + 1e-20)
    wts = wts * cfg["rsf"]
    return idx, wts, margin


def forward(cfg, w):
    idx, wts, margin = route(cfg, w)
    x = w["x"]
    y = torch.zeros_like(x)
    for e in range(cfg["E"]):  # HF: per expert, its tokens in one batch
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        y.index_add_(0, tok, mlp(x[tok], w["eg"][e], w["eu"][e], w["ed"][e]) * wts[tok, slot].unsqueeze(-1))
    if cfg["I_s"]:
        y = y + mlp(x, w["sg"], w["su"], w["sd"])
    return y, idx, wts, margin


CONFIGS = {
    "v3": dict(T=5, d=8, E=8, K=2, G=4, topk_group=2, I_e=4, I_s=4, score="sigmoid", method="noaux_tc",
               norm=True, rsf=2.5),
    "v2_glg": dict(T=5, d=8, E=8, K=3, G=2, topk_group=1, I_e=4, I_s=8, score="softmax",
                   method="group_limited_greedy", norm=False, rsf=16.0),
    "v2_greedy": dict(T=5, d=8, E=8, K=2, G=1, topk_group=1, I_e=4, I_s=0, score="softmax", method="greedy",
                      norm=True, rsf=1.0),
}

if __name__ == "__main__":
    for name, cfg in CONFIGS.items():
        y, idx, wts, margin = forward(cfg, make(cfg))
        print(f"/* {name}: {cfg}; min selection margin {margin:.4g} */")
        print(f"static const float golden_{name}_out[] = {{")
        flat = [f"{v:.9g}f" for v in y.flatten().tolist()]
        for i in range(0, len(flat), 6):
            print("    " + ", ".join(flat[i:i + 6]) + ",")
        print("};")
        srt = torch.sort(idx, dim=-1).values.flatten().tolist()
        print(f"static const int32_t golden_{name}_idx[] = {{{', '.join(str(v) for v in srt)}}}; /* sorted per token */")
