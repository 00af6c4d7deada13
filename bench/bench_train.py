"""Training steps against the machine's own limits: the base configuration (ViT-B/14 with registers, 392 x 392),
forward, soft-mining + coherence loss, backward, clipping and a StableAdamW step, as each training script runs
them; this project's in fp32 and in bf16 autocast, the official code's in fp32 (--official DIR).

    python bench/bench_train.py                                   # this project: fp32 and bf16 on the CPU
    python bench/bench_train.py --official /path/to/INP-Former    # ... beside the official training step
    python bench/bench_train.py --before /tmp/before              # ... beside another checkout's (before/after)

The same harness as bench_model.py (its docstring says what is measured): the matrix-product rates at the
model's shapes, counted FLOPs per step, interleaved repetitions, the fraction of the roofline, and the ratio to
the official code.
"""
from bench_model import main

if __name__ == "__main__":
    main(mode="train", doc=__doc__)
