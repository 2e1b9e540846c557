"""Standard COCO caption metrics via pycocoevalcap, and the COCO results file format.

Predictions and references both go through the Stanford PTB tokenizer, as in
the official coco-caption evaluation, before BLEU-1..4, METEOR, ROUGE-L,
CIDEr and (when its models are installed) SPICE are computed. Every image
with a prediction is scored; references for other images are ignored.

CIDEr weights n-grams by their document frequency over the evaluated
references, so it is only meaningful on a reasonably large set of images (on
a single image every n-gram has zero weight and CIDEr is 0).

The scorers run Java subprocesses and pycocoevalcap writes its temporary
files inside its own installed package folder, which must be writable.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as _spice_module
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from diffcap.data.contract import DataError, describe_ids
from diffcap.io import PathLike, atomic_output

SpiceMode = Literal["auto", "on", "off"]

SPICE_LIB_DIR = Path(_spice_module.__file__).resolve().parent / "lib"
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None when its Stanford CoreNLP jars are installed."""
    missing = [jar for jar in SPICE_CORENLP_JARS if not (SPICE_LIB_DIR / jar).is_file()]
    if not missing:
        return None
    return (
        f"Stanford CoreNLP models missing from {SPICE_LIB_DIR} ({', '.join(missing)}); "
        "install them with `python -c 'from pycocoevalcap.spice.get_stanford_models import "
        "get_stanford_models as g; g()'` (a download of several hundred MB)"
    )


class _SafeMeteor(Meteor):
    """pycocoevalcap's METEOR wrapper with a shutdown that cannot hang.

    Upstream has two hazards. Java's stderr is a pipe that nobody reads, so a
    JVM that writes enough warnings or a stack trace blocks forever once the
    pipe buffer is full. And ``__del__`` takes the lock that ``compute_score``
    leaves held when it raises, so garbage collection after any METEOR error
    deadlocks the interpreter. Here stderr goes to a temporary file (quoted in
    errors) and :meth:`close` kills the JVM without touching the lock. The
    lock still serialises ``compute_score``: one instance must not be shared
    by threads that expect parallelism.
    """

    def __init__(self) -> None:
        self._stderr = tempfile.TemporaryFile()
        # Same command line as upstream Meteor.__init__, which hard-wires stderr=PIPE.
        self.meteor_cmd = [
            "java", "-jar", "-Xmx2G", _meteor_module.METEOR_JAR,
            "-", "-", "-stdio", "-l", "en", "-norm",
        ]  # fmt: skip
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd,
            cwd=Path(_meteor_module.__file__).resolve().parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.lock = threading.Lock()

    def score(self, gts: dict, res: dict) -> float:
        try:
            score, _ = self.compute_score(gts, res)
        except (ValueError, OSError) as exc:
            # A dead JVM shows up as an empty line that float() rejects, or a broken pipe.
            raise RuntimeError(f"METEOR (java) failed: {self._stderr_tail()}") from exc
        return float(score)

    def _stderr_tail(self, limit: int = 2000) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-limit:] or "no output on stderr"

    def close(self) -> None:
        process = getattr(self, "meteor_p", None)
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        if process.poll() is None:
            process.kill()
        process.wait()
        self._stderr.close()
        self.meteor_p = None

    def __del__(self) -> None:
        self.close()


def _one_line(text: str) -> str:
    # PTBTokenizer reads one caption per line and pairs output lines with
    # captions by position; a stray \r or \u2028 inside a caption would shift
    # every later caption onto the wrong image without any error.
    return " ".join(text.split())


def _tokenize_pairs(
    predictions: Mapping[Any, str], references: Mapping[Any, list[str]]
) -> tuple[dict[Any, list[str]], dict[Any, list[str]]]:
    """PTB-tokenize references and predictions into pycocoevalcap's ``(gts, res)`` dicts."""
    ids = list(predictions)
    # One tokenizer call for both sides saves a JVM start-up.
    request = {("ref", i): list(references[i]) for i in ids} | {("pred", i): [predictions[i]] for i in ids}
    tokenized = PTBTokenizer().tokenize(
        {key: [{"caption": _one_line(c)} for c in texts] for key, texts in request.items()}
    )
    if any(len(tokenized.get(key, ())) != len(texts) for key, texts in request.items()):
        raise RuntimeError("PTBTokenizer returned fewer lines than captions were sent")
    gts = {i: tokenized[("ref", i)] for i in ids}
    res = {i: tokenized[("pred", i)] for i in ids}
    return gts, res


def _validate(predictions: Mapping[Any, str], references: Mapping[Any, list[str]]) -> None:
    if not predictions:
        raise ValueError("no predictions to evaluate")
    unreferenced = [i for i in predictions if not references.get(i)]
    if unreferenced:
        raise ValueError(f"predictions without references for {describe_ids(unreferenced)}")
    for image_id, text in predictions.items():
        if not isinstance(text, str):
            raise TypeError(f"prediction for {image_id!r} is a {type(text).__name__}, not a string")
        refs = references[image_id]
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references for {image_id!r} must be a list of strings")
    if shutil.which("java") is None:
        raise RuntimeError("the COCO caption metrics need `java` on PATH")


def coco_metrics(
    predictions: Mapping[Any, str],
    references: Mapping[Any, list[str]],
    spice: SpiceMode = "auto",
) -> dict[str, Any]:
    """Score predicted captions against reference captions with the COCO metrics.

    Args:
        predictions: image id -> one predicted caption (may be empty).
        references: image id -> reference captions; must cover every predicted id.
        spice: "auto" computes SPICE when its CoreNLP models are installed and
            reports it as skipped otherwise (or when it fails); "on" raises
            instead of skipping; "off" never runs it.

    Returns:
        ``{"BLEU-1": .., "BLEU-2": .., "BLEU-3": .., "BLEU-4": .., "METEOR": ..,
        "ROUGE_L": .., "CIDEr": .., "SPICE": float | None, "n_images": int,
        "skipped": {metric: reason}}`` with plain Python floats.
    """
    if spice not in ("auto", "on", "off"):
        raise ValueError(f"spice must be 'auto', 'on' or 'off', got {spice!r}")
    _validate(predictions, references)
    skipped: dict[str, str] = {}
    if spice == "off":
        skipped["SPICE"] = "disabled (spice='off')"
    elif (reason := spice_unavailable_reason()) is not None:
        if spice == "on":
            raise RuntimeError(f"SPICE requested but unavailable: {reason}")
        skipped["SPICE"] = reason

    # METEOR spends seconds loading its paraphrase table; start its JVM first
    # so that it loads while the PTB tokenizer and the Python metrics run.
    meteor = _SafeMeteor()
    try:
        gts, res = _tokenize_pairs(predictions, references)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider_score, _ = Cider().compute_score(gts, res)
        meteor_score = meteor.score(gts, res)
    finally:
        meteor.close()
    result: dict[str, Any] = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    result |= {"METEOR": meteor_score, "ROUGE_L": float(rouge), "CIDEr": float(cider_score)}
    result["SPICE"] = None
    if "SPICE" not in skipped:
        try:
            result["SPICE"] = float(_spice_module.Spice().compute_score(gts, res)[0])
        except (subprocess.CalledProcessError, OSError) as exc:
            if spice == "on":
                raise RuntimeError(f"SPICE failed: {exc}") from exc
            skipped["SPICE"] = f"SPICE failed: {exc}"
    result["n_images"] = len(predictions)
    result["skipped"] = skipped
    return result


def cider(predictions: Mapping[Any, str], references: Mapping[Any, list[str]]) -> float:
    """CIDEr alone, tokenized exactly as in :func:`coco_metrics`, for quick validation.

    Skips METEOR's slow JVM start-up; on the same inputs it equals
    ``coco_metrics(...)["CIDEr"]``.
    """
    _validate(predictions, references)
    gts, res = _tokenize_pairs(predictions, references)
    return float(Cider().compute_score(gts, res)[0])


def write_coco_results(path: PathLike, predictions: Mapping[str, str]) -> None:
    """Write predictions atomically as a COCO results file: ``[{"image_id", "caption"}, ...]``.

    When every id is an integer written as a string (COCO's ids, which the captions file holds as
    JSON integers), the ids are written as integers: the official evaluation server matches results
    to its annotations by integer id. Other ids (Flickr file names, "007") are written as strings.
    """
    ids: list[Any] = list(predictions)
    if ids and all(_is_integer_id(i) for i in ids):
        ids = [int(i) for i in ids]
    entries = [{"image_id": i, "caption": caption} for i, caption in zip(ids, predictions.values())]
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(entries, f, ensure_ascii=False, indent=1)
        f.write("\n")


def _is_integer_id(image_id: Any) -> bool:
    """A string that int() turns into a number that prints back the same (so "007" and "+7" are not)."""
    text = str(image_id)
    return text.isascii() and text.isdigit() and str(int(text)) == text


def read_coco_results(path: PathLike) -> dict[str, str]:
    """Read a COCO results file into image id (as a string) -> caption."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: results file not found")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{image_id, caption}}, got {type(entries).__name__}")
    predictions: dict[str, str] = {}
    for n, entry in enumerate(entries):
        where = f"{path}: entry {n}"
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise DataError(f"{where}: expected an object with 'image_id' and 'caption', got {entry!r:.80}")
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, int | str):
            raise DataError(f"{where}: image_id must be a string or integer, got {image_id!r}")
        if not isinstance(caption, str):
            raise DataError(f"{where}: caption must be a string, got {caption!r}")
        image_id = str(image_id)
        if image_id in predictions:
            raise DataError(f"{where}: duplicate image_id {image_id!r}")
        predictions[image_id] = caption
    return predictions


def evaluate_run(
    run_dir: PathLike,
    captions: PathLike,
    features: PathLike,
    split: str,
    out_dir: PathLike,
    *,
    device: str = "cpu",
    seed: int | None = None,
    report_images: int = 0,
    **sampler_overrides,
) -> dict:
    """Caption every image of ``split`` with a trained run and score it against that split's references.

    Writes ``out_dir/metrics.json`` and the COCO-format ``out_dir/results.json``; returns the metrics. With
    ``report_images`` > 0 also ``out_dir/report.html``: the metrics and, for that many images, the caption,
    the references and how the caption formed over the sampling steps (the pixels, for a CNN run).
    """
    from ..data.contract import FeatureStore, read_captions
    from ..io import write_json
    from ..pipeline import CaptionPipeline

    pipe = CaptionPipeline.from_pretrained(run_dir, device=device)
    references: dict[str, list[str]] = {}
    for record in read_captions(captions):
        if record.split == split:
            references.setdefault(record.image_id, []).append(record.caption)
    if not references:
        raise DataError(f"{captions}: no captions in split {split!r}")
    store = FeatureStore.open(features)
    image_ids = list(references)
    features = store.get(image_ids)
    # Only an iterative (diffusion) model has intermediate estimates; an autoregressive report shows captions alone.
    trajectory = report_images > 0 and pipe.model.iterative
    result = pipe(features, seed=seed, trajectory=trajectory, **sampler_overrides)
    predictions = dict(zip(image_ids, result.texts))
    metrics = coco_metrics(predictions, references)
    metrics.update(split=split, run=str(run_dir))
    published = Path(pipe.run_dir) / "checkpoint.json"  # which training step the weights are from
    if published.is_file():
        metrics["train_step"] = json.loads(published.read_text()).get("step")
    out = Path(out_dir)
    write_coco_results(out / "results.json", predictions)
    write_json(out / "metrics.json", metrics)
    if report_images > 0:
        from .report import caption_items, write_report

        pixels = dict(zip(image_ids, features)) if store.spec.is_pixels else None
        items = caption_items(image_ids, result.texts, result.trajectories, references, pixels, report_images)
        write_report(out / "report.html", items, metrics, title=f"diffcap eval: {run_dir}, split {split}")
    return metrics
