"""The ONNX backend: the tokenizer and the ONNX Runtime sessions (one per model slot) of an exported model folder."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import numpy as np
from tokenizers import Encoding, Tokenizer

from service import runtime, tasks, weights

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

FUNCTIONS = ("softmax", "sigmoid", "none")
# Tokenizers without a real limit store int(1e30) as model_max_length.
_ABSURD_LENGTH = 1_000_000
# Position embeddings of these models start after the padding index, so two positions are unusable.
_OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}
# A text is cut to max_length x this many characters (at a word boundary) before it is tokenized,
# so a 2 MiB text costs what a max-length one costs. English runs at ~5 characters per token; a cut
# text that still overflows max_length tokens is truncated exactly as the whole text would be.
CLIP_CHARS_PER_TOKEN = 10
# A cut text that does not overflow (whitespace runs, very long words) is read again up to this many
# characters per token; characters beyond that are never read.
WIDE_CLIP_CHARS_PER_TOKEN = 100
# Idle intra-op threads spin this long (microseconds) before they sleep, and stop spinning when no
# run is in progress: most of spinning's latency gain at one client, little of its cost under load.
SPIN_MICROSECONDS = 50

_EDGE = 200  # characters near a cut searched for a word boundary
_WHITESPACE = re.compile(r"\s")
_LAST_WHITESPACE = re.compile(r"\s(?=\S*\Z)")

Input = str | tuple[str, str]  # one text, or a (text, text_pair) pair for a sentence-pair model
Direction = Literal["right", "left"]


class ModelLoadError(RuntimeError):
    """The model folder cannot be served; the message says why in one line."""


class InferenceError(RuntimeError):
    """Running the model failed for a request that passed validation."""


class InputTooLong(ValueError):
    """An input has more tokens than the model takes and truncation was not allowed."""

    def __init__(self, index: int, max_length: int) -> None:
        """Store which input is too long and the model's limit."""
        super().__init__(f"input {index} has more than {max_length} tokens, the model's limit; "
                         "send it with truncation allowed or shorten it")
        self.index = index
        self.max_length = max_length


class Prediction(TypedDict):
    """One label and its score."""

    label: str
    score: float


class Token(TypedDict):
    """One token of a text, as TEI's /tokenize describes it (start and stop are UTF-8 byte offsets)."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


def read_json(path: Path) -> dict[str, Any]:
    """Return a JSON object from a file or raise ModelLoadError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path.name} is missing in {path.parent}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def labels_from_config(config: dict[str, Any], path: Path) -> list[str]:
    """Return the labels in logit order from a config's id2label, or raise ModelLoadError."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise ModelLoadError(f"{path} has no id2label mapping")
    try:
        by_index = {int(key): str(value) for key, value in id2label.items()}
    except ValueError:
        raise ModelLoadError(f"{path}: id2label keys must be integers") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ModelLoadError(f"{path}: id2label keys must be 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def default_function(config: dict[str, Any], num_labels: int) -> str:
    """Return the score function transformers' TextClassificationPipeline would apply."""
    problem_type = config.get("problem_type")
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def apply_function(logits: np.ndarray, function: str) -> np.ndarray:
    """Turn logits [batch, labels] into float64 scores with softmax, sigmoid or nothing."""
    values = np.asarray(logits, dtype=np.float64)
    if function == "softmax":
        shifted = np.exp(values - values.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    if function == "sigmoid":
        # exp(-log(1 + exp(-x))) cannot overflow, unlike 1 / (1 + exp(-x)) for very negative x
        return np.exp(-np.logaddexp(0.0, -values))
    if function == "none":
        return values
    raise ValueError(f"unknown function_to_apply {function!r}")


def rank(scores: np.ndarray, labels: Sequence[str], top_k: int | None) -> list[list[Prediction]]:
    """Return, per row, labels sorted by score descending, cut to top_k (None: all)."""
    results = []
    for row in scores:
        # stable sort keeps label order on ties, as transformers' list.sort does
        order = np.argsort(-row, kind="stable")[: top_k if top_k is not None else len(labels)]
        results.append([Prediction(label=labels[i], score=float(row[i])) for i in order])
    return results


def model_max_length(tokenizer_config: dict[str, Any], config: dict[str, Any]) -> int:
    """Return min(tokenizer model_max_length, usable position embeddings), ignoring absurd values."""
    limits = []
    declared = tokenizer_config.get("model_max_length")
    if isinstance(declared, (int, float)) and 0 < declared < _ABSURD_LENGTH:
        limits.append(int(declared))
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        limits.append(positions - _OFFSET_POSITIONS.get(str(config.get("model_type")), 0))
    return min(limits) if limits else 512


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """Return manifest.json, checked for its name and files map but not against the files."""
    manifest = read_json(model_dir / "manifest.json")
    missing = [key for key in ("name", "files") if key not in manifest]
    if missing or not isinstance(manifest["files"], dict):
        raise ModelLoadError(f"{model_dir / 'manifest.json'} lacks {', '.join(missing) or 'a files map'}")
    return manifest


def verify_files(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists against its sha256; raise ModelLoadError naming the first that fails."""
    for relative, expected in manifest["files"].items():
        path = model_dir / relative
        if not path.is_file():
            raise ModelLoadError(f"{path} is listed in manifest.json but missing")
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != str(expected).lower():
            raise ModelLoadError(f"{path} does not match its sha256 in manifest.json (corrupt or changed)")


class Classifier:
    """Tokenize, run and post-process texts with an exported ONNX text classifier.

    Every backend (this one, and the reference ones of service/reference.py) answers `name`, `labels`,
    `task`, `backend`, `model_path`, `logits()`, `postprocess()`, `classify()`, `warmup()` and `info()`,
    and declares what else it can do: `encodes`, whether it encodes texts apart from running them
    (`encode()`, `tokens()`, `collate()`, `run()`), which the batch scheduler, per-stage timing and
    TEI's /tokenize need.
    """

    backend = "onnx"
    encodes = True

    def __init__(self, model_dir: Path, intra_op_threads: int = 1, spinning: bool = True, *,
                 sessions: int = 1, lone_threads: int = 0, verify: bool = True,
                 cache_dir: Path | None = None) -> None:
        """Load and check the model folder; raise ModelLoadError with one clear line if unusable.

        `sessions` is how many runs may go at once without sharing a session (the model slots): two
        runs at once of one session share its allocator and buffers, and ran slower than two sessions
        (docs/performance.md). With `lone_threads`, one more session with that many intra-op threads
        takes each run that starts while no other is in progress, so a request at low load has
        every core, while runs side by side keep a share each. `verify=False` skips the manifest
        (for a folder still being written, such as the export's). With `cache_dir`, a verified model
        whose weights are inline in model.onnx is served from a memory-mapped copy kept there
        (service/weights.py).
        """
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir) if verify else {}
        self.intra_op_threads = intra_op_threads
        self.spinning = spinning
        self.model_path = self.model_dir / "model.onnx"  # the file the session loaded
        # A memory-mapped copy written at an earlier start (or image build) is loaded while this thread
        # hashes the model files and reads the tokenizer: onnxruntime builds a session without the GIL.
        # A copy is only ever written after the model has been verified (below).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-model") as loader:
            early = loader.submit(self._early_session, cache_dir)
            self._read_folder(verify)
            session = early.result()
        self.session = session if session is not None else self._session(cache_dir)
        self._check_model()
        # onnxruntime has no thread count per run, so the lone runs' threads need a session of their own.
        more = self._more_sessions([intra_op_threads] * (sessions - 1) + [lone_threads] * (lone_threads > 0))
        self._lone = more.pop() if lone_threads > 0 else None
        # Idle sessions, taken last-in first-out by run(); session (taken first) is also the one shared
        # when more runs go at once than there are sessions.
        self._sessions = (*more, self.session)
        self._idle: deque[ort.InferenceSession] = deque(self._sessions)
        self._running = 0  # runs in progress, counted only when there is a lone session
        self._running_lock = threading.Lock()
        self.ready = False

    def _read_folder(self, verify: bool) -> None:
        """Verify the manifest's files, then read the config and the tokenizer."""
        if verify:
            verify_files(self.model_dir, self.manifest)
        self.config = read_json(self.model_dir / "config.json")
        self.labels = labels_from_config(self.config, self.model_dir / "config.json")
        self.function = default_function(self.config, len(self.labels))
        tokenizer_config = read_json(self.model_dir / "tokenizer_config.json")
        self.max_length = model_max_length(tokenizer_config, self.config)
        self.truncation_side: Direction = ("left" if tokenizer_config.get("truncation_side") == "left"
                                           else "right")
        self.name = str(self.manifest.get("name") or self.model_dir.name)
        # One tokenizer per truncation side (and one that does not truncate, for tokens()), each
        # configured once and never changed: encoding only reads it, so threads may share it
        # (tokenizers #537 concerns changing settings while in use). Those other than the right-
        # truncating one are made on first use: most models never need them.
        right = self._configured_tokenizer(tokenizer_config)
        self._tokenizers: dict[str, Tokenizer] = {"right": right}
        self._derived_lock = threading.Lock()
        self._vocab_size = right.get_vocab_size(with_added_tokens=True)
        self.task = self._task(tokenizer_config)

    def _task(self, tokenizer_config: dict[str, Any]) -> tasks.Task:
        """Return the task the manifest names (detected from config.json where it names none)."""
        name = self.manifest.get("task") or tasks.detect(self.config)
        if name not in tasks.TASKS:
            raise ModelLoadError(f"manifest.json names the task {name!r}; this service serves "
                                 f"{', '.join(tasks.TASKS)}")
        if name == tasks.TOKEN_CLASSIFICATION:
            unk = _token_text(tokenizer_config.get("unk_token"))
            return tasks.TokenClassification(self._tokenizer("untruncated"), self.labels, self.max_length,
                                             self._tokenizers["right"].token_to_id(unk) if unk else None)
        if name == tasks.ZERO_SHOT_CLASSIFICATION:
            try:
                return tasks.ZeroShotClassification(self.labels)
            except ValueError:
                raise ModelLoadError(f"manifest.json names the task {name} but no label of config.json starts "
                                     "with 'entail'") from None
        return tasks.TextClassification()

    def _configured_tokenizer(self, tokenizer_config: dict[str, Any]) -> Tokenizer:
        """Return tokenizer.json with truncation at max_length; remember how to pad for collate()."""
        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"tokenizer.json is missing in {self.model_dir} (a fast tokenizer is needed)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses for bad files
            raise ModelLoadError(f"{path} is not a valid tokenizer ({type(exc).__name__})") from None
        # longest_first, as transformers truncates pairs
        tokenizer.enable_truncation(max_length=self.max_length, direction="right")
        padding = tokenizer.padding or {}
        pad_token = padding.get("pad_token") or _token_text(tokenizer_config.get("pad_token"))
        pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
        if pad_id is None:
            pad_id = 0  # masked positions never reach the logits, so any valid id pads correctly
        # Padding happens in collate(), so texts tokenized by different request threads can share
        # one batch padded to its own longest text.
        self._pad_id, self._pad_type_id = pad_id, int(padding.get("pad_type_id", 0))
        self._pad_left = padding.get("direction", "right") == "left"
        tokenizer.no_padding()
        return tokenizer

    def _tokenizer(self, kind: str) -> Tokenizer:
        """Return the tokenizer truncating on the "right" or "left", the "only_first" one (a pair's first text
        alone, as zero-shot truncates), or the "untruncated" one."""
        tokenizer = self._tokenizers.get(kind)
        if tokenizer is None:
            with self._derived_lock:
                tokenizer = self._tokenizers.get(kind)
                if tokenizer is None:
                    tokenizer = Tokenizer.from_str(self._tokenizers["right"].to_str())
                    if kind == "left":
                        tokenizer.enable_truncation(max_length=self.max_length, direction="left")
                    elif kind == "only_first":
                        tokenizer.enable_truncation(max_length=self.max_length, strategy="only_first")
                    else:
                        tokenizer.no_truncation()
                    self._tokenizers[kind] = tokenizer  # configured before any thread can see it
        return tokenizer

    def _options(self, threads: int | None = None) -> ort.SessionOptions:
        """Return the session options of the service: threads (default: intra_op_threads), spinning,
        full graph optimization."""
        ort = runtime.onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or self.intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Memory patterns are planned per input shape; with every request a new sequence length
        # they only grow the arena (onnxruntime #11118, #9313).
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        # Spinning between a run's parallel sections saves the wake-up of each; spinning between
        # runs would burn the CPU that request threads and a second run need, so it is bounded
        # and stops as soon as no run is in progress.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if self.spinning:
            options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_MICROSECONDS))
            options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def _early_session(self, cache_dir: Path | None) -> ort.InferenceSession | None:
        """Return a session of the memory-mapped copy if one was written before, else None."""
        digest = self._digest()
        if cache_dir is None or digest is None:
            return None
        try:
            path = self.model_dir / "model.onnx"
            copy = weights.existing_copy(digest, cache_dir) if weights.has_inline_weights(path) else None
        except OSError:  # no model.onnx: the sequential load reports it
            return None
        return self._load_copy(copy) if copy is not None else None

    def _session(self, cache_dir: Path | None) -> ort.InferenceSession:
        """Return the one InferenceSession of this process, shared by all request threads."""
        path = self.model_dir / "model.onnx"
        if not path.is_file():
            raise ModelLoadError(f"model.onnx is missing in {self.model_dir}")
        digest = self._digest()  # verified by now: only a verified model is copied
        if cache_dir is not None and digest is not None and weights.has_inline_weights(path):
            copy = weights.mapped_copy(path, digest, cache_dir)
            session = self._load_copy(copy) if copy is not None else None
            if session is not None:
                return session
            if copy is not None:
                logger.warning("serving %s with its weights in memory", path)
        try:
            return self._new_session(path)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"{path} cannot be loaded by onnxruntime {runtime.onnxruntime().__version__} "
                                 f"({type(exc).__name__})") from None

    def _new_session(self, path: Path, threads: int | None = None) -> ort.InferenceSession:
        """Return a CPU session of the file at path with the service's options."""
        return runtime.onnxruntime().InferenceSession(str(path), sess_options=self._options(threads),
                                                      providers=["CPUExecutionProvider"])

    def _more_sessions(self, threads: list[int]) -> list[ort.InferenceSession]:
        """Return more sessions of the loaded file, one per intra-op thread count, built side by side and
        each run once on the warm-up batches (which the first session runs later, through the queue)."""
        count = len(threads)
        if count <= 0:
            return []
        feeds = [self.tokenize(texts) for texts in self.warmup_batches()]

        def build(intra_op_threads: int) -> ort.InferenceSession:
            session = self._new_session(self.model_path, intra_op_threads)
            for feed in feeds:
                session.run(["logits"], feed)
            return session

        try:
            with ThreadPoolExecutor(max_workers=count, thread_name_prefix="load-model") as builders:
                return list(builders.map(build, threads))
        except Exception as exc:  # the first session of the same file loaded: out of memory, most likely
            raise ModelLoadError(f"{self.model_path} loaded once but not {count + 1} times "
                                 f"({type(exc).__name__})") from None

    def _digest(self) -> str | None:
        """Return model.onnx's sha256 from the manifest, which names its memory-mapped copy."""
        digest = (self.manifest.get("files") or {}).get("model.onnx")
        return digest if isinstance(digest, str) else None

    def _load_copy(self, copy: Path) -> ort.InferenceSession | None:
        """Return a session of a memory-mapped copy, or None (the copy removed) if it cannot be loaded."""
        try:
            session = self._new_session(copy)
        except Exception as exc:  # a damaged copy: the model itself is still there
            logger.warning("the memory-mapped copy %s cannot be loaded (%s); removed", copy, type(exc).__name__)
            weights.discard(copy)
            return None
        self.model_path = copy
        return session

    def _check_model(self) -> None:
        """Check inputs, the logits width and that every tokenizer id fits the embedding table."""
        inputs = [i.name for i in self.session.get_inputs()]
        unknown = sorted(set(inputs) - {"input_ids", "attention_mask", "token_type_ids"})
        if "input_ids" not in inputs or unknown:
            raise ModelLoadError(f"model.onnx inputs {inputs} are not those of a text classifier "
                                 "(input_ids, attention_mask[, token_type_ids])")
        self.input_names = inputs
        if "logits" not in [o.name for o in self.session.get_outputs()]:
            raise ModelLoadError("model.onnx has no 'logits' output")
        vocab_size = self.config.get("vocab_size")
        tokens = self._vocab_size
        if isinstance(vocab_size, int) and tokens > vocab_size:
            raise ModelLoadError(f"tokenizer.json has {tokens} tokens but the model's vocab_size is "
                                 f"{vocab_size}: tokenizer and model do not match")
        # ORT's Gather rejects out-of-range ids, so the highest id probes the embedding table size.
        probe = np.array([[0, tokens - 1]], dtype=np.int64)
        quiet = runtime.onnxruntime().RunOptions()
        quiet.log_severity_level = 4  # the failure is reported in one line below, not by ORT's logger too
        try:
            (logits,) = self.session.run(["logits"], self._feeds(probe, np.ones_like(probe)), quiet)
        except Exception as exc:
            raise ModelLoadError(f"model.onnx rejects token id {tokens - 1} of tokenizer.json: "
                                 f"tokenizer and model do not match ({type(exc).__name__})") from None
        expected = (1, 2, len(self.labels)) if self.task.per_token else (1, len(self.labels))
        if logits.shape != expected:
            raise ModelLoadError(f"model.onnx returns logits of shape {list(logits.shape)}, not {list(expected)} "
                                 f"for a {self.task.name} model whose config.json id2label has "
                                 f"{len(self.labels)} labels")

    def encode(self, inputs: Sequence[Input], *, truncate: bool = True,
               direction: Direction | None = None, only_first: bool = False) -> list[Encoding]:
        """Return the unpadded encodings of texts or pairs, truncated to max_length tokens.

        Pairs are truncated longest first, as transformers does; with only_first, only their first
        text is (zero-shot's (text, hypothesis) pairs). With truncate=False an input over max_length
        raises InputTooLong instead.
        """
        tokenizer = self._tokenizer("only_first" if only_first else direction or self.truncation_side)
        left = (direction or self.truncation_side) == "left" and not only_first
        items = list(inputs)
        clipped = [_clip(item, self.max_length * CLIP_CHARS_PER_TOKEN, left) for item in items]
        try:
            encodings = tokenizer.encode_batch_fast(clipped)
        except Exception:  # only_first: a second text that alone fills max_length leaves no room to cut
            if not only_first:
                raise
            raise tasks.TaskError(f"a hypothesis leaves no room for the text within the model's {self.max_length} "
                                  "tokens; shorten the hypothesis_template or the candidate labels") from None
        for index, (item, cut) in enumerate(zip(items, clipped, strict=True)):
            if cut != item and not self._cut_is_exact(tokenizer, item, cut, encodings[index]):
                wide = _clip(item, self.max_length * WIDE_CLIP_CHARS_PER_TOKEN, left)
                encodings[index] = tokenizer.encode_batch_fast([wide])[0]
            if not truncate and encodings[index].overflowing:
                raise InputTooLong(index, self.max_length)
        return encodings

    def tokens(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[Token]]:
        """Return every token of each text, not truncated, with its text and byte offsets."""
        encodings = self._tokenizer("untruncated").encode_batch(list(texts), add_special_tokens=add_special_tokens)
        results = []
        for text, encoding in zip(texts, encodings, strict=True):
            tokens: list[Token] = []
            for token_id, token, (start, stop), special in zip(encoding.ids, encoding.tokens, encoding.offsets,
                                                              encoding.special_tokens_mask, strict=True):
                if special:
                    tokens.append(Token(id=token_id, text=token, special=True, start=None, stop=None))
                    continue
                # the Python binding counts characters; TEI's offsets count UTF-8 bytes
                byte_start = len(text[:start].encode())
                piece = text[start:stop]
                tokens.append(Token(id=token_id, text=piece, special=False, start=byte_start,
                                    stop=byte_start + len(piece.encode())))
            results.append(tokens)
        return results

    @staticmethod
    def _cut_is_exact(tokenizer: Tokenizer, item: Input, cut: Input, encoding: Encoding) -> bool:
        """Return whether a cut input truncates to the same tokens as the whole one."""
        if isinstance(cut, str):
            return bool(encoding.overflowing)  # the cut text alone is over the limit
        # a pair is truncated longest first: each text that was cut must be over the limit on its own
        return all(bool(tokenizer.encode(part, add_special_tokens=False).overflowing)
                   for part, whole in zip(cut, item, strict=True) if part != whole)

    def collate(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """Return int64 model inputs for encodings, padded to the longest of them."""
        length = max(len(encoding) for encoding in encodings)
        ids = np.full((len(encodings), length), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        type_ids = np.full((len(encodings), length), self._pad_type_id, dtype=np.int64)
        for row, encoding in enumerate(encodings):
            size = len(encoding)
            columns = slice(length - size, length) if self._pad_left else slice(0, size)
            ids[row, columns] = encoding.ids
            mask[row, columns] = 1
            type_ids[row, columns] = encoding.type_ids
        feeds = self._feeds(ids, mask)
        if "token_type_ids" in feeds:
            feeds["token_type_ids"] = type_ids
        return feeds

    def tokenize(self, inputs: Sequence[Input]) -> dict[str, np.ndarray]:
        """Return int64 model inputs for texts or pairs, truncated and padded to the longest."""
        return self.collate(self.encode(inputs))

    def _feeds(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Return the inputs the graph declares, token types defaulting to zeros."""
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: feeds[name] for name in self.input_names}

    def run(self, feeds: dict[str, np.ndarray], alone: bool = True) -> np.ndarray:
        """Return the logits [batch, labels] for tokenized inputs: on the lone session if no other run
        is in progress and the caller expects none (`alone`), else on an idle session if there is
        one, else on the first."""
        lone = False
        if self._lone is not None:
            with self._running_lock:
                self._running += 1
                lone = alone and self._running == 1
        session = None  # the idle session taken, given back after the run
        if not lone:
            try:
                session = self._idle.pop()  # deque.pop and append are atomic: no lock needed
            except IndexError:
                pass
        used = self._lone if lone and self._lone is not None else self.session if session is None else session
        try:
            (logits,) = used.run(["logits"], feeds)
        except Exception as exc:  # ORT's exception types are not part of its public API
            raise InferenceError(f"onnxruntime failed on a batch of shape {list(feeds['input_ids'].shape)}") from exc
        finally:
            if session is not None:
                self._idle.append(session)
            if self._lone is not None:
                with self._running_lock:
                    self._running -= 1
        return logits

    def split(self, logits: np.ndarray, encodings: Sequence[Encoding]) -> Sequence[np.ndarray]:
        """Return each input's logits of a run: its row, or for a per-token task its tokens' rows without padding."""
        if not self.task.per_token:
            return logits
        width = logits.shape[1]
        return [logits[row, width - len(encoding):] if self._pad_left else logits[row, :len(encoding)]
                for row, encoding in enumerate(encodings)]

    @property
    def sessions(self) -> int:
        """Return how many sessions this classifier holds, the lone one included."""
        return len(self._sessions) + (self._lone is not None)

    def postprocess(self, logits: np.ndarray, top_k: int | None,
                    function_to_apply: str | None = None) -> list[list[Prediction]]:
        """Return ranked predictions per text, as TextClassificationPipeline computes them."""
        scores = apply_function(logits, function_to_apply or self.function)
        return rank(scores, self.labels, top_k)

    def logits(self, inputs: Sequence[Input], *, truncate: bool = True,
               direction: Direction | None = None) -> np.ndarray:
        """Return the logits [inputs, labels] of texts or pairs in one run (no batching)."""
        logits = self.run(self.collate(self.encode(inputs, truncate=truncate, direction=direction)))
        self.ready = True
        return logits

    def classify(self, inputs: Sequence[Input], top_k: int | None = None,
                 function_to_apply: str | None = None) -> list[list[Prediction]]:
        """Return, per text or pair, labels sorted by score (top_k of them, None: all)."""
        return self.postprocess(self.logits(inputs), top_k, function_to_apply)

    def warmup_batches(self) -> list[list[str]]:
        """Return a short text and a max-length one, so the first request does not pay ORT's first-run costs.

        One long text is enough: after it, a first run of two is no slower than the runs after it.
        """
        return [["warm up"], ["warm up " * self.max_length]]

    def warmup(self) -> None:
        """Run the warm-up batches."""
        for texts in self.warmup_batches():
            self.logits(texts)

    def info(self) -> dict[str, Any]:
        """Return what /info says about the model."""
        return {
            "name": self.name,
            "task": self.task.name,
            "labels": list(self.labels),
            "function_to_apply": self.function,
            "max_length": self.max_length,
            "inputs": list(self.input_names),
            "source": _without_paths(self.manifest.get("source")),
            **{key: self.manifest.get(key) for key in ("quantization", "validation", "created_at")},
        }


def _clip(item: Input, limit: int, keep_end: bool) -> Input:
    """Return a text, or each text of a pair, cut to at most `limit` characters at a word boundary."""
    if isinstance(item, tuple):
        return (_clip_text(item[0], limit, keep_end), _clip_text(item[1], limit, keep_end))
    return _clip_text(item, limit, keep_end)


def _clip_text(text: str, limit: int, keep_end: bool) -> str:
    """Return the first (or last) `limit` characters of text, not splitting its edge word if it can."""
    if len(text) <= limit:
        return text
    # Cut at whitespace near the edge, so the kept words tokenize as they do in the whole text; a
    # longer run without whitespace is one word that tokenizers split or replace with [UNK] anyway.
    if keep_end:
        cut = text[-limit:]
        space = _WHITESPACE.search(cut, 0, _EDGE)
        return cut[space.start():] if space else cut
    cut = text[:limit]
    space = _LAST_WHITESPACE.search(cut, max(0, limit - _EDGE))
    return cut[:space.start()] if space else cut


def _without_paths(value: Any) -> Any:
    """Return a manifest value without its "path" entries: folders of the export machine are not public."""
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items() if key != "path"}
    if isinstance(value, list):
        return [_without_paths(item) for item in value]
    return value


def _token_text(value: Any) -> str | None:
    """Return a special token's text whether tokenizer_config stores it as a string or a dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
