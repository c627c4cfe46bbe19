"""Is bf16 worth it on this CPU? Times fp32 vs bf16 matmuls and one SmolLM2 forward with and
without bf16 autocast. On CPUs without AMX (or AVX512-BF16), bf16 is emulated and slow.

    python benchmarks/matmul_dtype.py
"""

import time

import torch

from phatgoose.models import load_base_model


def gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    a = torch.randn(n, n).to(dtype)
    a @ a  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * n**3 / (time.perf_counter() - start) / 1e9


def main() -> None:
    print(f"threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"matmul 1024^2: fp32 {gflops(torch.float32):.1f} GFLOP/s, "
          f"bf16 {gflops(torch.bfloat16):.1f} GFLOP/s")
    model = load_base_model().model
    ids = torch.randint(0, 1000, (8, 64))
    for bf16 in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids)
            start = time.perf_counter()
            model(input_ids=ids)
        print(f"SmolLM2 forward 8x64 tokens, bf16 autocast {bf16}: "
              f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
