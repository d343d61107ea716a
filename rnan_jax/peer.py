"""The PyTorch peer's train step (../shared/peers/rnan_torch.py), run in a process of its own for
`bench.peer_steps`: a process that has run an XLA:CPU program slows PyTorch's CPU step afterwards (the small
model's channels_last step 69-78 ms before, 80-88 ms after our step ran in the same process, the same process
idle in between: tools/BENCHMARKS.md), so in-process timings flattered rnan_jax.

    python -m rnan_jax.peer PEER_DIR '{"scale": 2, "features": 32, ...}' BATCH PATCH

builds the peer's RNAN for those RNANConfig fields (all but rgb_mean, as `bench.peer_steps` sends them) in
NCHW and channels_last (float32, Adam), prints one JSON line describing them (or {"error": ...}), then reads
commands from stdin: `LAYOUT N` runs N train steps (forward, L1, backward, Adam) of that layout, waits for the
device and prints `ok`; `quit` (or the end of stdin) exits. Nothing here imports JAX.
"""
from __future__ import annotations

import json
import sys

LAYOUTS = ("nchw", "channels_last")


def _steps(peer_dir: str, fields: dict, batch: int, patch: int):
    import torch

    sys.path.insert(0, peer_dir)
    try:
        from rnan_torch import RNAN as TorchRNAN
    finally:
        sys.path.remove(peer_dir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = fields["scale"]
    steps, meta = {}, []
    for layout in LAYOUTS:
        torch.manual_seed(0)
        model = TorchRNAN(scale=s, c=fields["features"], n_groups=fields["num_groups"], n_blocks=fields["num_blocks"],
                          group_interval=fields["group_interval"], block_interval=fields["block_interval"],
                          r=fields["gc_reduction"]).to(dev)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model = model.to(memory_format=fmt)
        x = torch.rand(batch, 3, patch, patch, device=dev).to(memory_format=fmt)
        y = torch.rand(batch, 3, s * patch, s * patch, device=dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def run(n: int, model=model, x=x, y=y, opt=opt) -> None:
            for _ in range(n):
                loss = (model(x) - y).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()

        steps[layout] = run
        meta.append({"peer": f"torch {torch.__version__} eager float32 {layout}", "device": dev,
                     "threads": torch.get_num_threads(), "batch": batch, "patch": patch})
    return steps, meta


def main(argv: list[str]) -> int:
    from rnan_jax import env

    env.reuse_freed_memory()  # the malloc settings of the process that times rnan_jax's step
    peer_dir, fields, batch, patch = argv[0], json.loads(argv[1]), int(argv[2]), int(argv[3])
    try:
        steps, meta = _steps(peer_dir, fields, batch, patch)
    except Exception as e:  # reported to the parent, which records it and goes on without the peer
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps({"peers": meta}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        steps[words[0]](int(words[1]))
        print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
