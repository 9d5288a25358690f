"""One decoding step's attention at Phi-2's shape (32 heads of 80), side by side, on CUDA.

For each batch (rows, longest prompt) it draws prompt lengths, right-aligns them in a static cache of the longest
prompt plus 60 new tokens, as static decoding does, and times one call of each way to attend, 30 new tokens in:

- `masked_sdpa`: SDPA over every cache column under the padding mask (decoding with `speedups: false`)
- `flash_varlen`: PyTorch's variable-length flash kernel over each row's filled run of a token-major cache
- `split_kv/<columns per split>`: `decode_attention_kernel` over each row's filled run of the head-major cache

It prints microseconds per call, the filled keys and values read per second, and the largest difference from an
fp32 softmax over the filled columns.

    PYTHONPATH=. python bench/decode_attention.py [--batches 346x512 154x1126] [--output FILE.json]
"""

from __future__ import annotations

import argparse

import torch

from bench import gpu_metrics
from phi2_assets.ml.speedups.decode_attention_kernel import attend_filled_columns

HEADS, HEAD_DIM, NEW_TOKENS, STEP = 32, 80, 60, 30


def _batch(rows: int, longest: int, generator: torch.Generator):
    lengths = torch.randint(longest // 4, longest + 1, (rows,), generator=generator).sort().values
    lengths[-1] = longest
    cache_columns, columns = longest + NEW_TOKENS, longest
    shape = (rows, HEADS, cache_columns, HEAD_DIM)
    keys, values = (torch.randn(shape, generator=generator).to("cuda", torch.bfloat16) for _ in range(2))
    query = torch.randn(rows, HEADS, 1, HEAD_DIM, generator=generator).to("cuda", torch.bfloat16)
    starts = (columns - lengths).to("cuda", torch.int32)
    used = (lengths + STEP).to("cuda", torch.int32)
    return query, keys, values, starts, used


def _ways(query, keys, values, starts, used):
    rows, _, cache_columns, _ = keys.shape
    positions = torch.arange(cache_columns, device="cuda")
    mask = ((positions >= starts[:, None]) & (positions < (starts + used)[:, None]))[:, None, None, :]
    token_keys, token_values = (t.transpose(1, 2).contiguous().view(-1, HEADS, HEAD_DIM) for t in (keys, values))
    base = torch.arange(rows + 1, device="cuda", dtype=torch.int32)
    key_starts = base * cache_columns + torch.cat([starts, starts.new_zeros(1)])
    flat_query = query.transpose(1, 2).reshape(rows, HEADS, HEAD_DIM)
    ways = {
        "masked_sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask),
        "flash_varlen": lambda: torch.ops.aten._flash_attention_forward(
            flat_query, token_keys, token_values, base, key_starts, 1, cache_columns, 0.0, False, False,
            scale=HEAD_DIM ** -0.5, seqused_k=used)[0].view(rows, 1, HEADS, HEAD_DIM).transpose(1, 2),
    }
    for width in (128, 256, 512, 1024):
        ways[f"split_kv/{width}"] = (lambda width=width: attend_filled_columns(
            query, keys, values, starts, used, HEAD_DIM ** -0.5, columns_per_split=width).transpose(1, 2))
    return ways, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", default=["346x512", "154x1126"], help="ROWSxLONGEST")
    parser.add_argument("--output", help="write the figures as JSON here too")
    args = parser.parse_args()
    generator, results = torch.Generator().manual_seed(0), []
    for spec in args.batches:
        rows, longest = map(int, spec.split("x"))
        query, keys, values, starts, used = _batch(rows, longest, generator)
        ways, mask = _ways(query, keys, values, starts, used)
        reference = torch.nn.functional.scaled_dot_product_attention(query.float(), keys.float(), values.float(),
                                                                     attn_mask=mask)
        filled_bytes = 2 * int(used.sum()) * HEADS * HEAD_DIM * keys.element_size()
        for name, call in ways.items():
            microseconds = gpu_metrics.cuda_milliseconds(call, repeats=50, warm_ups=5) * 1000
            difference = float((call().float() - reference).abs().max())
            results.append({"batch": spec, "way": name, "us": round(microseconds, 1),
                            "filled_tb_s": round(filled_bytes / microseconds / 1e6, 3),
                            "max_abs_difference": difference})
            print(f"{spec:>10} {name:>14} {microseconds:9.1f} us {filled_bytes / microseconds / 1e6:6.2f} TB/s "
                  f"max |diff| {difference:.2e}", flush=True)
    if args.output:
        gpu_metrics.write_kernel_results(args.output, results)


if __name__ == "__main__":
    main()
