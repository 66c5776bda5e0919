"""torch_common.py: what bench/torch_model.py and bench/torch_decode.py share — the config's dimensions with
the DeepSeek-V3 defaults, and the RoPE frequencies with YaRN and the softmax scale (MODEL-SPEC 5.4, 5.5)."""

import math
from types import SimpleNamespace


def setup(torch, threads, seed):
    """The thread count the C side uses (intra-op; one inter-op thread) and the seed."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(seed)


def config_dims(cfg):
    def get(key, default=None):
        v = cfg.get(key, default)
        return default if v is None else v

    model_type = get("model_type", "deepseek_v3")
    scoring = get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax")
    return SimpleNamespace(
        get=get,
        V=cfg["vocab_size"], d=cfg["hidden_size"], L=cfg["num_hidden_layers"], H=cfg["num_attention_heads"],
        I=cfg["intermediate_size"], Ie=get("moe_intermediate_size", 0),
        E=get("n_routed_experts", 0), K=get("num_experts_per_tok", 1), Ns=get("n_shared_experts", 0),
        G=get("n_group", 1), Gtop=get("topk_group", 1), model_type=model_type, scoring=scoring,
        method=get("topk_method", "noaux_tc" if scoring == "sigmoid" else "greedy"),
        norm_topk=get("norm_topk_prob", model_type == "deepseek_v3"),
        rsf=float(get("routed_scaling_factor", 2.5 if model_type == "deepseek_v3" else 1.0)),
        k_dense=get("first_k_dense_replace", 0), freq=get("moe_layer_freq", 1),
        rq=get("q_lora_rank", 0), rkv=cfg["kv_lora_rank"],
        dn=cfg["qk_nope_head_dim"], dr=cfg["qk_rope_head_dim"], dv=cfg["v_head_dim"],
        dqk=cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], eps=float(get("rms_norm_eps", 1e-6)),
        theta=float(get("rope_theta", 10000.0)), rope_scaling=cfg.get("rope_scaling") or {})


def rope_freqs(torch, c):
    """(inv_freq over dr/2 pairs, softmax scale) with YaRN's ramp and mscale_all_dim squared."""
    dr, theta, rs = c.dr, c.theta, c.rope_scaling
    inv = 1.0 / (theta ** (torch.arange(0, dr, 2, dtype=torch.float32) / dr))
    scale = c.dqk ** -0.5
    if rs.get("type", rs.get("rope_type", "default")) == "yarn":
        s = float(rs["factor"])
        L0 = rs.get("original_max_position_embeddings", 4096)

        def cd(r):
            return dr * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(theta))

        low, high = max(math.floor(cd(rs.get("beta_fast", 32))), 0), min(math.ceil(cd(rs.get("beta_slow", 1))), dr - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dr // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        inv = inv * (1 - ramp) + inv / s * ramp
        msa = rs.get("mscale_all_dim") or 0
        if s > 1 and msa:
            m = 0.1 * msa * math.log(s) + 1
            scale *= m * m
    return inv, scale
