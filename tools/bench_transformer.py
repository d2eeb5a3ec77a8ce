"""Benchmark of transformer pruning on the bundled all-MiniLM-L6-v2 sentence encoder.
docs/benchmarks/transformer.md holds its latest table.

    python tools/bench_transformer.py [--speedup 2] [--seq-len 128] [--structures heads neurons all]
                                      [--recover-steps 300] [--corpus 30000] [--compensate] [--in-flight 2]
                                      [--no-task] [--markdown]

Data: sentences of the Python standard library's docstrings (tools/text_task.py), split into sentences to calibrate
and distil on and 400 held-out sentences never seen by a build; with --corpus N, N more unlabelled sentences to
distil on, from the docstrings of installed packages (torch, numpy, scipy, ...; none of the held-out ones).
For each --structures (attention heads only, MLP neurons only, or both), `edgeprune build --speedup S --calib
sentences.txt` on x86-openvino (--compensate: with the least-squares refit), with recovery by cosine distillation
of the unpruned embeddings; then the measured speedup, and the mean cosine similarity of the *shipped OpenVINO
artifact's* embeddings of the held-out sentences to the unpruned model's (PyTorch).

The labelled task (unless --no-task): which of 10 library packages a sentence documents. `--train train.tsv` gives
the encoder a classifier, fine-tuned first; then the unpruned reference (a MACs budget of 1.0: nothing cut) and the
pruned model, both judged by the shipped artifact's accuracy on test.tsv (40 sentences per class).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_task import write_corpus, write_task  # noqa: E402

SPEC = "edgeprune.zoo:minilm_l6"
HELD_OUT = 400


def run_artifact(folder: Path, ids: np.ndarray) -> np.ndarray:
    """The OpenVINO artifact's outputs on ``ids``, one sentence at a time (the shape it was built for)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU")
    return np.concatenate([compiled([ids[i : i + 1]])[0] for i in range(len(ids))])


def build(args, out: Path, structures: str, calib: Path, train: Path | None = None, unpruned: bool = False) -> dict:
    from edgeprune.errors import EdgepruneError
    from edgeprune.pipeline import BuildOptions
    from edgeprune.pipeline import build as run_build
    from edgeprune.target import Budget

    budget = Budget(macs_ratio=1.0) if unpruned else Budget(speedup=args.speedup)
    options = BuildOptions(
        model=SPEC, input_shape=(1, args.seq_len), calib=str(calib), train=str(train) if train else None, out=out,
        force=True, budget=budget, structures=structures, recover_steps=args.recover_steps, compensate=args.compensate,
        calib_limit=args.calib_limit, adapt_steps=args.adapt_steps, in_flight=args.in_flight,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        report = run_build(options, say=lambda *a, **k: None)
    except EdgepruneError as exc:
        return {"error": str(exc)[:160], "seconds": time.perf_counter() - started}
    return {"report": report, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--structures", nargs="*", default=["heads", "neurons", "all"])
    parser.add_argument("--recover-steps", type=int, default=300)
    parser.add_argument("--corpus", type=int, default=0, help="unlabelled sentences to add for distillation")
    parser.add_argument("--compensate", action="store_true", help="the least-squares refit before distillation")
    parser.add_argument("--calib-limit", type=int, default=None, help="default: every calibration sentence")
    parser.add_argument("--adapt-steps", type=int, default=150)
    parser.add_argument(
        "--in-flight",
        type=int,
        default=1,
        help="candidates per round (2: goals at the band's edges, so the least pruned can land near the budget)",
    )
    parser.add_argument("--no-task", action="store_true", help="skip the labelled task")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    from edgeprune.model import load_model
    from edgeprune.tokens import read_text, tokenize

    work = Path(tempfile.mkdtemp(prefix="bench-transformer-"))
    write_task(work)
    sentences, _ = read_text(work / "sentences.txt")
    calib = sentences[HELD_OUT:]
    if args.corpus:
        write_corpus(work, set(sentences[:HELD_OUT]))
        calib += (work / "corpus.txt").read_text(encoding="utf-8").splitlines()[: args.corpus]
    (work / "calib.txt").write_text("\n".join(calib) + "\n", encoding="utf-8")
    args.calib_limit = args.calib_limit or len(calib)
    print(f"{len(calib)} sentences to calibrate and distil on, {HELD_OUT} held out", file=sys.stderr)
    loaded = load_model(SPEC, input_shape=(1, args.seq_len))
    held_ids = tokenize(loaded.input.tokenizer, sentences[:HELD_OUT], args.seq_len)
    with torch.no_grad():
        reference = torch.cat([loaded.module(held_ids[i : i + 64]) for i in range(0, HELD_OUT, 64)]).numpy()

    rows = []
    for structures in args.structures:
        done = build(args, work / f"out-{structures}", structures, work / "calib.txt")
        row = {"what": f"embeddings, {structures}", "seconds": done["seconds"]}
        if "error" in done:
            row["error"] = done["error"]
        else:
            report = done["report"]
            embeddings = run_artifact(work / f"out-{structures}", held_ids.numpy())
            cosine = np.sum(embeddings * reference, 1) / (
                np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1)
            )
            quality = report["quality"]
            row |= {"speedup": report["result"]["speedup"], "p50": report["result"]["latency_ms"]["p50"],
                    "params": report["result"]["params"], "before": quality.get("pruned"),
                    "metric": f"cosine {float(np.mean(cosine)):.3f} (min {float(np.min(cosine)):.2f})",
                    "steps": quality.get("distill_steps", 0)}  # fmt: skip
        rows.append(row)
        print(row, file=sys.stderr, flush=True)

    if not args.no_task:
        test_sentences, test_labels = read_text(work / "test.tsv")
        test_ids = tokenize(loaded.input.tokenizer, test_sentences, args.seq_len).numpy()
        for unpruned in (True, False):
            out = work / f"task-{'unpruned' if unpruned else 'pruned'}"
            done = build(args, out, "all", work / "calib.txt", train=work / "train.tsv", unpruned=unpruned)
            row = {"what": "task, " + ("unpruned fine-tuned" if unpruned else "all"), "seconds": done["seconds"]}
            if "error" in done:
                row["error"] = done["error"]
            else:
                report = done["report"]
                names = sorted(set(test_labels))
                truth = np.array([names.index(label) for label in test_labels])
                accuracy = float(np.mean(run_artifact(out, test_ids).argmax(1) == truth))
                row |= {"speedup": report["result"]["speedup"], "p50": report["result"]["latency_ms"]["p50"],
                        "params": report["result"]["params"], "before": report["quality"].get("pruned"),
                        "metric": f"test accuracy {accuracy:.3f}",
                        "steps": report["quality"].get("distill_steps", 0)}  # fmt: skip
            rows.append(row)
            print(row, file=sys.stderr, flush=True)

    header = ["model", "speedup (measured)", "p50 ms", "params", "before recovery", "after recovery", "steps", "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['what']} | failed: {row['error']} | | | | | | {row['seconds']:.0f} |")
            continue
        before = "" if row["before"] is None else f"{row['before']:.3f}"
        lines.append(f"| {row['what']} | {row['speedup']:.2f}x | {row['p50']:.2f} | {row['params'] / 1e6:.2f} M |"
                     f" {before} | {row['metric']} | {row['steps']} | {row['seconds']:.0f} |")  # fmt: skip
    print("\n".join(lines) if args.markdown else "\n".join(line.replace("|", " ") for line in lines))


if __name__ == "__main__":
    main()
