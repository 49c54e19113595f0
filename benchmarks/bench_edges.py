"""Speed of the `edges` twin pass at 224 px (not a test): prints a table of ms per image.

    python benchmarks/bench_edges.py [--n 160] [--size 224] [--batches 16 32] [--repeats 3] [--threads N] [--data-dir DIR]

On the first `--n` Fashion-MNIST test items resized to `--size` (as `data.image_size` does), for each
batch size, best of `--repeats`:
  1. the twin pass: `PairMaker("edges").fix_twins`, what training runs once before the first step
  2. kornia's `canny` alone, with its own hysteresis (all the degradation ran before it linked edges itself)
  3. kornia's `canny` without hysteresis: blur, Sobel, non-maximum suppression and thresholds only
and checks that the twins equal kornia's Canny edges pixel for pixel.
"""  # noqa: E501 - the usage line above is --help text, kept whole
from __future__ import annotations

import argparse
import platform
import time

import kornia
import torch

from cqd.data import DATASETS
from cqd.data.fashion_mnist import FashionMNIST
from cqd.data.paired import PairMaker


def best_ms_per_image(fn, n: int, repeats: int) -> float:
    """The fastest of `repeats` calls of fn, in ms per image of the n it handles."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=160, help="images")
    ap.add_argument("--size", type=int, default=224, help="image side in px")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32], help="batch sizes")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the fastest counts)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is steadier on a busy machine")
    ap.add_argument("--data-dir", help="Fashion-MNIST folder (default: cqd's usual search)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    small = DATASETS.get("fashion_mnist")(args.data_dir, "test", 28)
    ds = FashionMNIST(small.images[: args.n, 0], small.labels[: args.n], args.size)
    n = len(ds)
    T = PairMaker("edges").T
    k = 2 * int(2 * T.sigma + 0.5) + 1  # the kernel size the degradation uses

    print(f"{platform.machine()} {platform.processor()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), "
          f"kornia {kornia.__version__}; {n} Fashion-MNIST test items at {args.size} px\n")
    print("| batch | twin pass (`edges`) ms/image | kornia canny ms/image "
          "| canny without hysteresis ms/image | twins = canny |")
    print("|---|---|---|---|---|")
    for bs in args.batches:
        def batches():
            for i in range(0, n, bs):
                yield ds.__getitems__(list(range(i, min(i + bs, n))))

        def canny(hysteresis: bool) -> list[torch.Tensor]:
            return [kornia.filters.canny(b["full"].float() / 255, T.low, T.high, (k, k), (T.sigma, T.sigma),
                                         hysteresis=hysteresis)[1] for b in batches()]

        maker = PairMaker("edges")
        twin = best_ms_per_image(lambda: maker.fix_twins(batches(), "cpu", n), n, args.repeats)
        op = best_ms_per_image(lambda: canny(True), n, args.repeats)
        floor = best_ms_per_image(lambda: canny(False), n, args.repeats)
        twins = torch.cat([maker.views(b, "cpu")[1] for b in batches()])  # looked up, not remade
        same = torch.equal(twins, torch.cat(canny(True)))
        print(f"| {bs} | {twin:.1f} | {op:.1f} | {floor:.1f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
