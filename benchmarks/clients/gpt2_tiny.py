"""Client 3: a tiny GPT-2 from Hugging Face ``transformers``, random weights, trained with AdamW.

The model is built from a ``GPT2Config`` (nothing is downloaded): 2 layers, 128 dimensions, 4
heads, 128 positions, a character vocabulary. The text is the English documentation that ships
inside Python itself (``pydoc_data.topics``, the text of ``help('topic')``: about 750 kB of prose
and examples); the first 90% of it trains, the last 10% validates. AdamW (lr 1e-3, weight decay
0.01, 5% linear warm-up then linear decay), batch 32 blocks of 128 characters drawn at random
(seeded). The only sparsecore line is ``attach(model, optimizer, density=..., total_steps=...)``.

    python benchmarks/clients/gpt2_tiny.py --steps 300 --out r.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import numpy as np
import torch

STEPS = 600
BLOCK = 128


def load_text() -> str:
    """Python's own documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def encode(text: str) -> tuple[np.ndarray, list[str]]:
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return np.array([index[c] for c in text], dtype=np.int64), vocab


def build(vocab_size: int, width: float, layers: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    heads = 4
    embd = max(heads, heads * round(128 * width / heads))
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=BLOCK,
        n_embd=embd,
        n_layer=layers,
        n_head=heads,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def block_weights(model: torch.nn.Module) -> int:
    """Weights of the transformer blocks' projections (what sparsecore makes sparse)."""
    return sum(
        p.numel() for n, p in model.named_parameters() if ".h." in n and n.endswith("weight")
        and p.ndim == 2
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, density=0.2)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--val-blocks", type=int, default=None, help="validate on the first N blocks (quick runs)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data, vocab = encode(load_text())
    split = int(0.9 * len(data))
    train, val = torch.from_numpy(data[:split]), torch.from_numpy(data[split:])
    # validation: every non-overlapping block of the held-out text (fixed, the same for all runs)
    nval = (len(val) - 1) // BLOCK
    if args.val_blocks is not None:
        nval = min(nval, args.val_blocks)
    val_x = val[: nval * BLOCK].view(nval, BLOCK)
    val_y = val[1 : nval * BLOCK + 1].view(nval, BLOCK)

    model = build(len(vocab), args.width, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup))),
    )
    sparse = None
    if not args.dense:
        import sparsecore.torch

        sparse = sparsecore.torch.attach(
            model, optimizer, total_steps=args.steps, **common.sparse_options(args)
        )

    def val_loss() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(0, nval, 64):
                logits = model(val_x[i : i + 64]).logits
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), val_y[i : i + 64].reshape(-1),
                    reduction="sum",
                ).item()  # fmt: skip
        model.train()
        return total / (nval * BLOCK)

    gen = torch.Generator().manual_seed(args.seed)
    history = []
    model.train()
    running = 0.0
    every = max(1, args.steps // 4)  # validation four times in the run
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train) - BLOCK - 1, (args.batch_size,), generator=gen)
        x = torch.stack([train[s : s + BLOCK] for s in starts.tolist()])
        y = torch.stack([train[s + 1 : s + BLOCK + 1] for s in starts.tolist()])
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % every == 0 or step == args.steps:
            row = {"step": step, "train_loss": running / every, "val_loss": val_loss()}
            running = 0.0
            history.append(row)
            print(f"step {step}/{args.steps} train loss {row['train_loss']:.4f} val loss "
                  f"{row['val_loss']:.4f}", flush=True)  # fmt: skip

    final_val = history[-1]["val_loss"]
    result: dict = {
        "client": "gpt2_tiny",
        "text": "pydoc_data.topics (Python's documentation topics)",
        "text_chars": len(data),
        "vocab": len(vocab),
        "epochs": history,
        "final": {"val_loss": final_val, "val_ppl": math.exp(final_val)},
        "weights": block_weights(model),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if sparse is not None:
        result["density"] = sparse.density()
        result["sparse_layers"] = sparse.names
        result["layer_densities"] = sparse.layer_densities()
        result["config"] = sparse.config.to_dict()
        result["momentum_source"] = getattr(sparse, "momentum_source", None)
        last = sparse.last_report
        if last is not None:
            result["last_update"] = last.to_dict()
    common.write_result(args, result, started)


if __name__ == "__main__":
    main()
