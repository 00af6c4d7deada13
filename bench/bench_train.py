"""Training throughput and peak memory of the base configuration (ViT-B/14 with registers, 392x392):
forward, soft-mining + coherence loss, backward, clipping and a StableAdamW step, as train.py runs them.

    python bench/bench_train.py                                   # this project: CPU fp32 and bf16 (+ CUDA)
    python bench/bench_train.py --official ~/src/INP-Former       # ... and the official training step, same machine
    python bench/bench_train.py --batch 16 --iters 10             # on a GPU

Same harness as bench_model.py: one fresh process per measurement, random weights, peak memory of that
process (CPU: peak resident set size; CUDA: torch.cuda.max_memory_allocated).
"""
from bench_model import main

if __name__ == "__main__":
    main(mode="train", doc=__doc__)
