"""Model folders in the Hugging Face Hub's layout: write one, find one (a local folder or a Hub name).

A folder holds three files, which the Hub shows as a model page:

* ``config.yaml``: the config of the run that made the model (what builds the network);
* ``model.safetensors``: the weights, with the class names, the config and the file's
  description in its header (:func:`wrn_det.engine.weights_file.save_safetensors`);
* ``README.md``: the model card, a YAML header the Hub reads (``library_name``, ``tags``,
  ``datasets``, ``metrics``, ``license``, ``pipeline_tag``, the evaluation results as a
  ``model-index``) above the text a reader reads (network, dataset, classes, the run's
  evaluation table, the training command, the licence, the paper's citation). The header is
  written by ``huggingface_hub``'s own :class:`~huggingface_hub.ModelCardData` and
  :class:`~huggingface_hub.EvalResult`.

:func:`write_model_folder` writes the folder atomically (a reader never sees half of it);
:func:`resolve_model_folder` finds one: a local folder as it is, an ``owner/name`` through
``huggingface_hub.snapshot_download`` (downloaded once into its cache). The detection
predictor (``wrn_det.Predictor.from_pretrained``) and the classifiers
(``wrn_det.models.from_pretrained``) stand on these; what goes into the card is theirs.
``huggingface_hub`` is needed for the card and for Hub names, not for reading a local folder.
"""
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import WrnDetError
from .fileio import atomic_write_dir

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "LIBRARY_NAME", "PAPER_CITATION", "write_model_folder",
           "model_card", "resolve_model_folder", "run_command", "evaluation_rows"]

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.yaml", "model.safetensors", "README.md"
#: ``library_name`` of the cards written here.
LIBRARY_NAME = "wrn-det"

PAPER_CITATION = """@inproceedings{zagoruyko2016wide,
  title     = {Wide Residual Networks},
  author    = {Zagoruyko, Sergey and Komodakis, Nikos},
  booktitle = {Proceedings of the British Machine Vision Conference (BMVC)},
  pages     = {87.1--87.12},
  year      = {2016},
  doi       = {10.5244/C.30.87}
}"""

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise WrnDetError("model cards and Hub names need the huggingface_hub package "
                          "(pip install huggingface_hub, or the hub extra of wrn_det)") from None
    return huggingface_hub


def run_command(run_dir: str) -> Optional[str]:
    """Return the command line that started the run in ``run_dir`` (from its ``log.txt``), or None."""
    path = os.path.join(run_dir, "log.txt")
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        for line in f:
            m = re.search(r"command: (.+)$", line.rstrip("\n"))
            if m:
                return m.group(1).strip()
    return None


def evaluation_rows(run_dir: str, keep) -> List[Tuple[str, float]]:
    """Return ``[(metric, value)]`` of the newest evaluation in ``run_dir``'s ``metrics.json`` (or
    ``eval_metrics.json`` of an ``--eval-only`` run), the metrics ``keep(name)`` accepts; ``[]`` when there is none.
    """
    from .events import read_json_lines

    rows: List[dict] = []
    for name in ("eval_metrics.json", "metrics.json"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            try:
                rows += read_json_lines(path)
            except WrnDetError:
                continue  # a damaged metrics file leaves the card without its table, not the export without a card
    for row in reversed(rows):
        found = [(k, float(v)) for k, v in row.items() if keep(k) and isinstance(v, (int, float)) and v == v]
        if found:
            return found
    return []


def model_card(*, title: str, summary: str, facts: Sequence[Tuple[str, str]], pipeline_tag: str,
               tags: Sequence[str], datasets: Sequence[str], metrics: Sequence[str], license: str,
               evaluation: Sequence[Tuple[str, float]] = (), evaluated_on: str = "", eval_results=(),
               command: Optional[str] = None, usage: str = "") -> str:
    """Return a model card (``README.md`` text) whose YAML header the Hub reads.

    ``facts``: ``(what, value)`` lines (network, dataset, classes, ...); ``evaluation``: the
    run's ``(metric, value)`` table, ``evaluated_on`` the dataset it was measured on;
    ``eval_results``: ``huggingface_hub.EvalResult`` objects for the header's ``model-index``;
    ``command``: how the run was started; ``usage``: a Python snippet. The header is
    :class:`huggingface_hub.ModelCardData`'s; the card is checked by parsing it back with
    :class:`huggingface_hub.ModelCard`.
    """
    hub = _hub()
    data = hub.ModelCardData(library_name=LIBRARY_NAME, license=license, pipeline_tag=pipeline_tag,
                             tags=list(tags), datasets=list(datasets) or None, metrics=list(metrics) or None,
                             model_name=title if eval_results else None, eval_results=list(eval_results) or None)
    lines = [f"# {title}", "", summary, ""]
    lines += [f"- **{what}**: {value}" for what, value in facts]
    if evaluation:
        lines += ["", "## Evaluation", "", f"The run's last evaluation{f' on {evaluated_on}' if evaluated_on else ''}:",
                  "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in evaluation]
    if command:
        lines += ["", "## Training", "", "The command that trained it (with the config in `config.yaml`):", "",
                  "```bash", command, "```"]
    if usage:
        lines += ["", "## Use", "", "```python", usage.strip(), "```"]
    lines += ["", "## Licence", "", f"`{license}` (the `license` field above)." if license != "unknown" else
              "Not stated by the person who exported it (`license: unknown`).",
              "", "## Citation", "", "```bibtex", PAPER_CITATION, "```", ""]
    card = hub.ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))
    return str(card)


def write_model_folder(folder: str, tensors: Mapping, config_text: str, card_text: str,
                       header: Optional[Dict] = None) -> str:
    """Write ``config.yaml``, ``model.safetensors`` (``tensors``, with ``header`` fields and the config) and
    ``README.md`` into ``folder`` atomically, replacing what was there; returns ``folder``."""
    from .weights_file import safetensors_writer

    weights = safetensors_writer(tensors, config=config_text, **(header or {}))

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(config_text)
        weights(os.path.join(tmp, WEIGHTS_NAME))
        with open(os.path.join(tmp, CARD_NAME), "w", encoding="utf-8", newline="") as f:
            f.write(card_text)

    return atomic_write_dir(folder, write)


def resolve_model_folder(name_or_path, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                         force_download: bool = False, token=None, local_files_only: bool = False) -> str:
    """Return a local folder holding ``config.yaml`` and ``model.safetensors`` for ``name_or_path``.

    A folder is taken as it is; ``owner/name`` (when no such folder exists) is a Hub
    repository, downloaded with ``huggingface_hub.snapshot_download`` (cached: a second call
    reads the cache; ``revision``, ``cache_dir``, ``force_download``, ``token`` and
    ``local_files_only`` are its arguments). Raises :class:`WrnDetError` in one line for a
    folder without the two files, a name that is neither, or a download that fails.
    """
    path = os.fspath(name_or_path)
    if not os.path.isdir(path):
        if not _HUB_NAME.fullmatch(path) or os.path.exists(path):
            raise WrnDetError(f"{path!r} is neither a model folder (config.yaml, model.safetensors) nor a Hub "
                              "repository name (owner/name)")
        hub = _hub()
        try:
            path = hub.snapshot_download(path, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                         token=token, local_files_only=local_files_only, library_name=LIBRARY_NAME,
                                         allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
        except Exception as e:  # network, authentication, missing repository: huggingface_hub's many errors
            raise WrnDetError(f"Hub repository {name_or_path!r} could not be downloaded ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise WrnDetError(f"model folder {path} lacks {' and '.join(missing)} (written by tools/export_model.py "
                          "--format hub)")
    return path
