#!/usr/bin/python3
"""PyTorch eager reference of csaq's salience pass, for bench/run.sh.

For each calibration sequence: forward pass of the Llama in MODEL_DIR (float32), mean
next-token cross-entropy, autograd backward, and |dL/dW * W| added into a float32
accumulator per decoder Linear (what the Python CSAQ package does). Sequences are the
consecutive --seq-len windows of a 1-D token .npy. Prints one JSON line: tokens/s, peak
resident memory, and the peak over the process's resident set before the model was loaded
(the interpreter and libraries excluded).

Reads safetensors itself (an 8-byte length, a JSON header, raw little-endian data): Debian
has no Python safetensors package.
"""
import argparse
import json
import math
import resource
import struct
import sys
import time

import numpy as np
import torch

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def load_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"]).to(torch.float32)
    return out


def rope_tables(cfg, seq_len):
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def forward(cfg, w, ids, cos, sin):
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    d, eps = h // heads, cfg["rms_norm_eps"]
    b, t = ids.shape
    mask = torch.full((t, t), float("-inf")).triu(1)
    x = w["model.embed_tokens.weight"][ids]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        y = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (y @ w[p + "self_attn.q_proj.weight"].t()).view(b, t, heads, d).transpose(1, 2)
        k = (y @ w[p + "self_attn.k_proj.weight"].t()).view(b, t, kv, d).transpose(1, 2)
        v = (y @ w[p + "self_attn.v_proj.weight"].t()).view(b, t, kv, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(heads // kv, dim=1)
        v = v.repeat_interleave(heads // kv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, t, h)
        x = x + o @ w[p + "self_attn.o_proj.weight"].t()
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = y @ w[p + "mlp.gate_proj.weight"].t()
        u = y @ w[p + "mlp.up_proj.weight"].t()
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].t()
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.t()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--samples", type=int, required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forward-only", action="store_true", help="the forward pass and loss alone, no gradients")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(f"{args.model}/config.json") as f:
        cfg = json.load(f)
    ids = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    baseline = rss_bytes()
    w = load_safetensors(f"{args.model}/model.safetensors")
    names = [f"model.layers.{l}.{n}.weight" for l in range(cfg["num_hidden_layers"]) for n in LINEARS]
    for n in names:
        w[n].requires_grad_(True)
    acc = {n: torch.zeros_like(w[n]) for n in names}
    cos, sin = rope_tables(cfg, args.seq_len)
    assert ids.numel() >= args.samples * args.seq_len, "not enough tokens"
    windows = ids[: args.samples * args.seq_len].view(args.samples, args.seq_len)
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on: the pass, not the load
        f.write("5")
    start = time.perf_counter()
    loss_sum = 0.0
    for s in range(args.samples):
        seq = windows[s : s + 1]
        if args.forward_only:
            with torch.no_grad():
                logits = forward(cfg, w, seq, cos, sin)
                loss_sum += torch.nn.functional.cross_entropy(logits[0, :-1], seq[0, 1:]).item()
            continue
        logits = forward(cfg, w, seq, cos, sin)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], seq[0, 1:])
        loss.backward()
        with torch.no_grad():
            for n in names:
                acc[n].add_((w[n].grad * w[n]).abs_())
                w[n].grad = None
        loss_sum += loss.item()
    elapsed = time.perf_counter() - start
    tokens = args.samples * args.seq_len
    print(json.dumps({"tool": "pytorch-eager", "pass": "forward" if args.forward_only else "salience", "torch": torch.__version__, "threads": args.threads,
                      "sequences": args.samples, "seq_len": args.seq_len, "tokens": tokens,
                      "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed,
                      "mean_loss": loss_sum / args.samples, "peak_rss_bytes": peak_rss_bytes(),
                      "peak_over_baseline_bytes": peak_rss_bytes() - baseline}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
