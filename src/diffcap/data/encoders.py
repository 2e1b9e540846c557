"""Encoders that turn a data set into the feature file of the contract: frozen CLIP for images, and
text encoders (the CLIP text tower or a sentence-transformers model) for text-only training.

Image extraction runs batched (fp16/bf16 on a GPU) and writes the shards of the store ``OUT/features/``
(and ``OUT/patch_features/`` for the patch grid), each atomically, so an interrupted run resumes at the
first unfinished shard; the index that makes the folder a store is written once all are done.

Pooled embeddings are L2-normalised: CLIP compares images and texts by cosine, so the norm carries
nothing, and normalised image and text embeddings share one space, which is what lets a captioner
trained on text embeddings caption images (CapDec, arXiv 2211.00575).

The feature files' metadata records ``encoder`` (hub id or absolute path), ``kind`` (one of
:data:`ENCODER_KINDS`) and ``output`` (``pooled`` or ``patches``), so a run trained on them knows how
to encode new images (see :func:`diffcap.pipeline.caption_images`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..io import atomic_output, write_json
from .errors import DataError, describe_ids
from .images import ImageError, load_image
from .shard_file import ShardFile, write_features
from .store import shard_name, write_index
from .store_index import INDEX_FILE

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "openai/clip-vit-base-patch32"
ENCODER_KINDS = ("clip-image", "clip-text", "sentence-transformers")
FEATURES_DIR, PATCH_FEATURES_DIR = "features", "patch_features"  # sharded stores (see data/store.py)
TEXT_FEATURES_FILE = "features.safetensors"  # text conditions: one file
MANIFEST_FILE = "manifest.json"  # what the shards were extracted from, to know when they can be reused


def resolve_encoder(encoder: str) -> str:
    """A local folder becomes an absolute path (so a run finds it from any working directory);
    anything else is a hub id and stays as given."""
    path = Path(encoder).expanduser()
    return str(path.resolve()) if path.exists() else encoder


def pick_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that have it, else fp16 on a GPU; fp32 on a CPU (half is slow there)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: choose auto, fp32, fp16 or bf16") from None


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading one tower of a full CLIP checkpoint reports the other tower's weights as unexpected;
    that is intended here, so keep the report out of the user's terminal."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a bar per tiny weight load says nothing; extraction has its own
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _tower_config(model_id: str, tower: str, local_files_only: bool = False):
    """The vision or text config of a CLIP checkpoint. A full CLIPModel checkpoint keeps the projection
    width at its top level, so copy it into the tower's config (the tower's own default is 512)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id, local_files_only=local_files_only)
    sub = getattr(config, f"{tower}_config", None)
    if sub is None:
        return config
    sub.projection_dim = config.projection_dim
    return sub


def _load_failed(model_id: str, what: str, exc: Exception) -> ValueError:
    return ValueError(
        f"{model_id}: cannot load {what} ({type(exc).__name__}: {exc}); pass a CLIP model id "
        "or a local folder saved with save_pretrained (offline: a local folder)"
    )


# ------------------------------------------------------------------------------------------------ images


class ClipImageEncoder:
    """Frozen CLIP vision tower + image processor; the text tokenizer is not needed for images.

    ``__call__(pixel_values)`` returns ``pooled``: the projected image embedding, L2-normalised,
    [B x P] (P = 512 for ViT-B/32), and with ``patch_tokens`` also ``patches``: the patch tokens after
    the final layer norm (the one the pooled token goes through), [B x N x H].
    """

    def __init__(
        self,
        model_id: str = DEFAULT_ENCODER,
        *,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        patch_tokens: bool = False,
        local_files_only: bool = False,  # a folder or the Hugging Face cache only: never download
    ):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.model_id = resolve_encoder(model_id)
        self.device = pick_device(device) if isinstance(device, str) else device
        self.dtype = pick_dtype(dtype, self.device)
        self.patch_tokens = patch_tokens
        try:
            with _quiet_transformers():
                local = {"local_files_only": local_files_only}
                self.processor = CLIPImageProcessor.from_pretrained(self.model_id, **local)
                self.model = CLIPVisionModelWithProjection.from_pretrained(
                    self.model_id, config=_tower_config(self.model_id, "vision", **local), use_safetensors=True, **local
                )
        except (OSError, ValueError, KeyError) as exc:
            raise _load_failed(self.model_id, "a CLIP vision tower and image processor", exc) from exc
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)

    def preprocess(self, image) -> torch.Tensor:
        """One PIL image -> pixel values [3 x S x S] (resize, centre crop, normalise)."""
        return _pixels(self.processor, image)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype))
        result = {"pooled": torch.nn.functional.normalize(out.image_embeds.float(), dim=-1).cpu()}
        if self.patch_tokens:
            grid = self.model.vision_model.post_layernorm(out.last_hidden_state[:, 1:])  # drop the class token
            result["patches"] = grid.half().cpu()  # (B, N, H); fp16 halves a large grid file
        return result

    def encode_images(self, images: list) -> dict[str, torch.Tensor]:
        """PIL images -> features (used to caption new images with a trained run)."""
        return self(torch.stack([self.preprocess(img) for img in images]))


def _pixels(processor, image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


class _ImageFiles(Dataset):
    """(id, pixel values or None, error message) per image; decoding runs in the loader's workers, which
    get only the image processor (not the model) when they start."""

    def __init__(self, items: list[tuple[str, Path]], processor):
        self.items, self.processor = items, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image_id, path = self.items[i]
        try:
            return image_id, _pixels(self.processor, load_image(path)), ""
        except ImageError as exc:
            return image_id, None, str(exc)


def _collate(batch):
    return batch


@dataclass
class Extraction:
    """What :func:`extract_image_features` wrote and what it left out."""

    files: dict[str, Path]
    n_images: int
    bad: list[tuple[str, str]] = field(default_factory=list)  # (image id, error naming the file)
    reused_shards: int = 0
    computed_shards: int = 0


def _finished(paths: list[Path]) -> bool:
    """A shard is done when each of its files (pooled, and the patch grid if asked for) has been written
    with every image read: a shard that met unreadable images is redone, in case they were fixed."""
    for path in paths:
        try:
            if not path.is_file() or json.loads(ShardFile(path).metadata.get("bad", "[]")):
                return False
        except (DataError, json.JSONDecodeError):
            return False
    return True


def _start_shards(folders: list[Path], manifest: dict) -> None:
    """Keep the shards of an interrupted run with the same inputs; otherwise start over. Either way the
    index goes until every shard is done, so a half-written store does not open."""
    path = folders[0] / MANIFEST_FILE
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INDEX_FILE).unlink(missing_ok=True)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old == manifest:
            return
        log.warning("%s: inputs or settings changed since the shards were written; starting over", folders[0])
    for folder in folders:
        for stale in folder.glob("shard-*.safetensors"):
            stale.unlink()
    write_json(path, manifest)


def _file_key(path: Path) -> str:
    """A file's path, size and modification time: an image replaced under the same name changes it, so
    its shard is not reused (hashing every image's bytes would cost a read of the whole data set)."""
    try:
        st = Path(path).stat()
    except OSError:
        return f"{path}\tmissing"
    return f"{path}\t{st.st_size}\t{st.st_mtime_ns}"


def extract_image_features(
    images: dict[str, Path],
    out_dir: str | Path,
    encoder: ClipImageEncoder,
    *,
    batch_size: int = 64,
    shard_size: int = 2048,
    workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
) -> Extraction:
    """Encode every image of ``images`` (id -> path) into the sharded store(s) ``out_dir/features/``
    (and ``out_dir/patch_features/`` for the patch grid).

    Shards of ``shard_size`` images (ids in sorted order) are written as they finish; a rerun with the
    same images and settings reuses every finished shard without decoding its images again. The index
    that makes the folder a store is written last.

    Unreadable or missing images fail the run after all shards are done, with the list of files
    (also written to ``OUT/bad_images.txt``), unless ``skip_bad``: then they are left out and counted.
    """
    out_dir = Path(out_dir)
    ids = sorted(images)
    if not ids:
        raise DataError(f"{out_dir}: no images to encode")
    manifest = {
        "encoder": encoder.model_id,
        "dtype": str(encoder.dtype),
        "patch_tokens": encoder.patch_tokens,
        "shard_size": shard_size,
        "n_images": len(ids),
        "images_sha1": hashlib.sha1("\n".join(f"{i}\t{_file_key(images[i])}" for i in ids).encode()).hexdigest(),
    }
    outputs = ["pooled", "patches"] if encoder.patch_tokens else ["pooled"]
    folders = {"pooled": out_dir / FEATURES_DIR, "patches": out_dir / PATCH_FEATURES_DIR}
    folders = {name: folders[name] for name in outputs}
    _start_shards(list(folders.values()), manifest)
    meta = {"encoder": encoder.model_id, "kind": "clip-image", "normalized": "true"}
    metas = {"pooled": meta | {"output": "pooled"}, "patches": meta | {"output": "patches", "normalized": "false"}}
    written: dict[str, list[Path]] = {name: [] for name in outputs}
    result = Extraction(files={}, n_images=len(ids))
    bar = tqdm(total=len(ids), desc="CLIP features", unit="img", disable=not progress, dynamic_ncols=True)
    for k, start in enumerate(range(0, len(ids), shard_size)):
        shard_ids = ids[start : start + shard_size]
        paths = {name: folder / shard_name(k) for name, folder in folders.items()}
        if _finished(list(paths.values())):
            result.reused_shards += 1
            bar.update(len(shard_ids))
            bad = []
        else:
            tensors, bad = _encode_shard(shard_ids, images, encoder, batch_size, workers, bar)
            for name, path in paths.items():
                items = {key.split("/", 1)[1]: v for key, v in tensors.items() if key.startswith(name + "/")}
                if items:
                    write_features(path, items, metas[name] | {"bad": json.dumps(bad)})
                else:  # every image of the shard was unreadable
                    path.unlink(missing_ok=True)
            result.computed_shards += 1
        for name, path in paths.items():
            if path.is_file():
                written[name].append(path)
        result.bad += [(image_id, message) for image_id, message in bad]
    bar.close()
    (out_dir / "bad_images.txt").unlink(missing_ok=True)  # a list from an earlier run would be stale
    if result.bad:
        listing = "\n".join(message for _, message in result.bad)
        with atomic_output(out_dir / "bad_images.txt") as tmp:
            tmp.write_text(listing + "\n")
        if not skip_bad:
            shown = "; ".join(message for _, message in result.bad[:10])
            more = f" (and {len(result.bad) - 10} more)" if len(result.bad) > 10 else ""
            raise DataError(
                f"{len(result.bad)} unreadable image(s), listed in {out_dir / 'bad_images.txt'}: "
                f"{shown}{more}; fix or remove them, or pass --skip-bad to leave them out"
            )
        log.warning("left out %d unreadable image(s), listed in %s", len(result.bad), out_dir / "bad_images.txt")
    if not written["pooled"]:
        raise DataError(f"{out_dir}: none of the {len(ids)} images could be read")
    for name, folder in folders.items():
        write_index(folder, written[name], metas[name])
        result.files[name] = folder
    return result


def _encode_shard(
    shard_ids: list[str], images: dict[str, Path], encoder: ClipImageEncoder, batch_size: int, workers: int, bar
) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    loader = DataLoader(
        _ImageFiles([(i, images[i]) for i in shard_ids], encoder.processor),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    tensors: dict[str, torch.Tensor] = {}
    bad: list[list[str]] = []
    for batch in loader:
        good = [(image_id, px) for image_id, px, _ in batch if px is not None]
        bad += [[image_id, message] for image_id, px, message in batch if px is None]
        if good:
            out = encoder(torch.stack([px for _, px in good]))
            for name, values in out.items():
                tensors.update({f"{name}/{image_id}": v.clone() for (image_id, _), v in zip(good, values)})
        bar.update(len(batch))
    return tensors, bad


# ------------------------------------------------------------------------------------------------ texts


def text_encoder_kind(encoder: str) -> str:
    """``sentence-transformers`` for a folder saved by that library (it has modules.json), else ``clip-text``."""
    return "sentence-transformers" if (Path(encoder) / "modules.json").is_file() else "clip-text"


class TextEncoder:
    """Sentences -> L2-normalised embeddings [N x D], by the CLIP text tower or a sentence-transformers model."""

    def __init__(
        self,
        encoder: str,
        *,
        kind: str | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 256,
        dtype: str = "fp32",
    ):
        self.encoder = resolve_encoder(encoder)
        self.kind = kind or text_encoder_kind(self.encoder)
        if self.kind not in ("clip-text", "sentence-transformers"):
            raise ValueError(f"text encoder kind {self.kind!r}: choose clip-text or sentence-transformers")
        self.device = pick_device(device) if isinstance(device, str) else device
        self.batch_size = batch_size
        self.dtype = pick_dtype(dtype, self.device)
        try:
            if self.kind == "sentence-transformers":
                from sentence_transformers import SentenceTransformer

                with _quiet_transformers():
                    # safetensors only: a pickled pytorch_model.bin could run code when torch.load reads it
                    self.model = SentenceTransformer(
                        self.encoder, device=str(self.device), model_kwargs={"use_safetensors": True}
                    )
                self.model.to(self.dtype)
            else:
                from transformers import AutoTokenizer, CLIPTextModelWithProjection

                with _quiet_transformers():
                    self.tokenizer = AutoTokenizer.from_pretrained(self.encoder)
                    self.model = CLIPTextModelWithProjection.from_pretrained(
                        self.encoder, config=_tower_config(self.encoder, "text"), use_safetensors=True
                    )
                self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        except ImportError as exc:
            raise ValueError(
                f"{self.encoder}: sentence-transformers is not installed (pip install sentence-transformers)"
            ) from exc
        except (OSError, ValueError, KeyError) as exc:
            raise _load_failed(self.encoder, f"a {self.kind} text encoder", exc) from exc

    @torch.no_grad()
    def __call__(self, sentences: list[str], progress: bool = False) -> torch.Tensor:
        if self.kind == "sentence-transformers":
            out = self.model.encode(
                sentences,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_tensor=True,
                show_progress_bar=progress,
            )
            return out.float().cpu()
        chunks = []
        max_len = self.model.config.max_position_embeddings  # CLIP's 77 tokens: longer captions are cut
        for start in tqdm(range(0, len(sentences), self.batch_size), desc="text features", disable=not progress):
            batch = self.tokenizer(
                sentences[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            out = self.model(
                input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
            )
            chunks.append(torch.nn.functional.normalize(out.text_embeds.float(), dim=-1).cpu())
        return torch.cat(chunks)


def write_text_features(
    path: str | Path,
    conditions: dict[str, str],
    encoder: TextEncoder,
    *,
    progress: bool = True,
    metadata: dict[str, str] | None = None,
) -> None:
    """Encode one condition sentence per image (id -> sentence) into a features file of the contract: one
    file, not a sharded store, since one pooled vector per image is small (12 MB for Flickr8k with MiniLM) and the
    encoding is not resumable anyway."""
    if not conditions:
        raise DataError(f"{path}: no condition sentences to encode")
    ids = list(conditions)
    vectors = encoder([conditions[i] for i in ids], progress=progress)
    if len(vectors) != len(ids):
        raise DataError(f"{encoder.encoder}: returned {len(vectors)} embeddings for {describe_ids(ids)}")
    meta = {"encoder": encoder.encoder, "kind": encoder.kind, "output": "pooled", "normalized": "true"}
    write_features(path, {i: v.clone() for i, v in zip(ids, vectors)}, meta | dict(metadata or {}))
