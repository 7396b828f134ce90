"""How calibration size and domain move quantized perplexity in and out of domain (smollm2-135m).

RTN (no calibration), GPTQ and AWQ at 4 and 3 bits, group 64, calibrated on ``calib_data`` x
``calib_samples`` windows of 512 tokens: ``docstrings`` (the offline corpus's tail: the domain
of the first evaluation text) or ``mixed`` (random windows of the corpus's second half and the
Python language reference); ``--diagnose``: ``prose`` (the license prose's second half, the
domain of the second evaluation text, whose start it never reads). Perplexity on ``--windows``
windows of 512 tokens of two texts: the docstring corpus's head, and Debian's license prose,
which no calibration set but the diagnostic one draws from.

    python benchmarks/calibration.py [--windows 8] [--sizes 16 64 128] [--out papers/results/calibration.md]
"""

import argparse
from pathlib import Path

import mmlab


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    ap.add_argument("--diagnose", action="store_true",
                    help="only GPTQ / AWQ calibrated on the prose's second half (in the prose's domain)")
    args = ap.parse_args()
    smol = mmlab.load("smollm2-135m")
    calibs = [("prose", 16)] if args.diagnose else [("docstrings", 16)] + [("mixed", n) for n in args.sizes]
    configs = [] if args.diagnose else [{"method": "rtn", "bits": b, "group_size": 64} for b in args.bits]
    configs += [{"method": m, "bits": b, "group_size": 64, "calib_data": d, "calib_samples": n}
                for m in ("gptq", "awq") for d, n in calibs for b in args.bits]
    df = mmlab.grid(smol, configs, text=mmlab.data.offline_corpus(), other_texts={"prose": mmlab.data.prose_corpus()},
                    window=512, max_windows=args.windows)
    data, sizes = df.get("calib_data", [None] * len(df)), df.get("calib_samples", [0] * len(df))
    df["calibration"] = [f"{d} x{int(n)}" if isinstance(d, str) else "-" for d, n in zip(data, sizes)]
    cols = ["method", "bits", "calibration", "perplexity", "perplexity_prose", "quantize_s"]
    table = df[[c for c in cols if c in df]].rename(columns={"perplexity": "docstrings", "perplexity_prose": "prose"})
    text = (f"smollm2-135m, group 64; perplexity on {args.windows} windows x 512 tokens of each text "
            f"(docstrings: the offline corpus's head; prose: Debian's license texts)\n\n"
            + table.to_markdown(index=False, floatfmt=".2f") + "\n")
    print(text)
    if args.out:
        args.out.write_text("# Calibration size and domain\n\nFrom `benchmarks/calibration.py`. " + text)


if __name__ == "__main__":
    main()
