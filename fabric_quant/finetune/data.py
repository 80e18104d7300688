"""Fine-tuning data: JSONL classification / instruction / chat files, or the built-in pydoc-topics task
(:mod:`fabric_quant.demo.data`).

Examples become token-id lists once; batches are cut from a seeded permutation per epoch so that a resumed run
sees exactly the micro-batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from fabric_quant.demo.data import pydoc_topics

IGNORE_INDEX = -100
PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


@dataclass
class Dataset:
    examples: list[dict[str, list[int]]]
    """Each with `input_ids` and `labels` (token list for causal-lm, [label id] for classification)."""
    labels: list[str] | None = None
    """Label names by id (classification)."""

    def __len__(self) -> int:
        return len(self.examples)


def read_jsonl(path: Path, required: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Records of a JSONL file; a malformed line raises ``ValueError`` naming the file and line number."""
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {err.start}: {err.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            for key, kind in required.items():
                if not isinstance(record.get(key), kind):
                    got = "missing" if key not in record else type(record[key]).__name__
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be {_name(kind)} (got {got})")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no examples")
    return records


def _name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def split(records: list[dict], val_fraction: float, seed: int, stratify: bool) -> tuple[list[dict], list[dict]]:
    """Held-out split, per label when ``stratify`` so that every label is in both parts."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    groups = defaultdict(list)
    for record in records:
        groups[record["label"] if stratify else None].append(record)
    rng = random.Random(seed)
    train, val = [], []
    for key in sorted(groups, key=str):
        items = groups[key][:]
        rng.shuffle(items)
        cut = max(1, round(len(items) * val_fraction))
        val += items[:cut]
        train += items[cut:]
    return train, val


def encode_classification(records: list[dict], tokenizer, max_len: int, labels: list[str], source: str) -> Dataset:
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for i, record in enumerate(records):
        label = str(record["label"])
        if label not in index:
            raise ValueError(f"{source}: example {i + 1} has label {label!r}, unseen in training. Known: {labels}")
        ids = tokenizer(record["text"], truncation=True, max_length=max_len)["input_ids"]
        examples.append({"input_ids": ids, "labels": [index[label]]})
    return Dataset(examples, labels)


def encode_instruction(records: list[dict], tokenizer, max_len: int, source: str = "data") -> Dataset:
    """Alpaca-style prompt; the prompt's tokens are masked out of the loss. Examples whose response is cut off
    entirely by ``max_len`` are dropped (they would contribute no loss, and a batch of them a NaN)."""
    examples = []
    for record in records:
        extra = record.get("input") or ""
        prompt = PROMPT.format(
            ctx=", paired with an input that provides further context" if extra else "",
            instruction=record["instruction"],
            input=f"### Input:\n{extra}\n\n" if extra else "",
        )
        # prompt and response are tokenized apart (no special tokens in between) so the mask boundary is exact
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = prompt_ids + tokenizer(record["output"], add_special_tokens=False)["input_ids"] + eos
        full = full[:max_len]
        n_prompt = min(len(prompt_ids), len(full))
        if n_prompt < len(full):
            examples.append({"input_ids": full, "labels": [IGNORE_INDEX] * n_prompt + full[n_prompt:]})
    if not examples:
        raise ValueError(f"{source}: every prompt is at least max_seq_length={max_len} tokens long; raise it")
    return Dataset(examples)


def encode_chat(records: list[dict], tokenizer, max_len: int, source: str = "data") -> Dataset:
    """Chat records (``{"messages": [{"role": ..., "content": ...}, ...]}``) through the tokenizer's chat template
    (a plain ``### Role:`` layout when it has none); only the assistant turns' tokens carry a loss."""
    examples = []
    for i, record in enumerate(records, 1):
        messages = record["messages"]
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                                   for m in messages):  # fmt: skip
            raise ValueError(f"{source}: record {i}: messages must be a non-empty list of {{role, content}} objects")
        ids, labels = [], []
        for turn in range(len(messages)):
            full = _render(tokenizer, messages[: turn + 1])
            if full[: len(ids)] != ids:  # a template that rewrites earlier turns: mask by whole prefix instead
                raise ValueError(f"{source}: record {i}: the chat template does not extend turn by turn")
            new = full[len(ids) :]
            labels += new if messages[turn]["role"] == "assistant" else [IGNORE_INDEX] * len(new)
            ids = full
        ids, labels = ids[:max_len], labels[:max_len]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise ValueError(f"{source}: no example keeps an assistant token within max_seq_length={max_len}")
    return Dataset(examples)


def load_tokenizer(path: Path):
    """The tokenizer of a model folder as transformers loads it (``AutoTokenizer``), made able to encode any text.

    A ``tokenizers`` model (WordLevel, WordPiece, BPE) maps a word outside its vocabulary to its ``unk_token``,
    and fails on that word ("WordLevel error: Missing [UNK] token from the vocabulary") when the token is not in
    its own vocabulary, e.g. ``WordLevel(vocab, unk_token="<unk>")`` without "<unk>" in ``vocab``, saved by
    ``PreTrainedTokenizerFast(..., unk_token="<unk>")``, which adds "<unk>" as an added token: the tokenizer then
    loads, and encodes in-vocabulary text, but any other word (the prompt template's) raises. The token the
    tokenizer declares (the added "<unk>", or transformers' ``unk_token`` where that is in the vocabulary) becomes
    the model's, so unknown words encode as that id, as the tokenizer declares. A tokenizer that transformers
    cannot load, or whose unknown-word token exists nowhere, is refused with the file named."""
    from transformers import AutoTokenizer

    path = Path(path)
    file = next((path / name for name in ("tokenizer.json", "tokenizer_config.json") if (path / name).is_file()), path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many kinds (OSError, ValueError, tokenizers' Exception)
        raise ValueError(f"{file}: transformers cannot load this tokenizer: {type(err).__name__}: {err}") from err
    backend = getattr(tokenizer, "backend_tokenizer", None)  # None: a Python ("slow") tokenizer
    if backend is None:
        return tokenizer
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    model = state.get("model") or {}
    unk, vocab = model.get("unk_token"), model.get("vocab")
    if not unk or not isinstance(vocab, dict) or unk in vocab:
        return tokenizer  # no unknown-word token (byte-level BPE), a Unigram model, or a usable one
    unk_id = backend.token_to_id(unk)  # an added token of that name
    if unk_id is None and tokenizer.unk_token in vocab:
        unk = tokenizer.unk_token
    elif unk_id is not None:
        vocab[unk] = unk_id
    else:
        raise ValueError(
            f"{file}: its {model.get('type', 'tokenizer')} model encodes words outside its vocabulary as"
            f" unk_token={unk!r}, which is neither in that vocabulary nor an added token, so any such word fails to"
            f" encode; add {unk!r} to the vocabulary or set the model's unk_token to one of its tokens"
        )
    model["unk_token"] = unk
    backend.model = Tokenizer.from_str(json.dumps(state)).model
    return tokenizer


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template (transformers 5 returns a mapping)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _render(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer.chat_template:
        return chat_ids(tokenizer, messages)
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def pack(dataset: Dataset, max_len: int) -> Dataset:
    """Concatenate short examples into sequences of ``max_len`` tokens (each keeps its own loss mask), so batches
    carry no padding; attention crosses example boundaries, as in the common constant-length packing."""
    ids, labels, packed = [], [], []
    for example in dataset.examples:
        ids += example["input_ids"]
        labels += example["labels"]
        while len(ids) >= max_len:
            packed.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
            ids, labels = ids[max_len:], labels[max_len:]
    if ids and any(label != IGNORE_INDEX for label in labels):
        packed.append({"input_ids": ids, "labels": labels})
    return Dataset(packed, dataset.labels)


def _first_record(path: Path) -> dict:
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return {}  # read_jsonl reports it with its line number
                return record if isinstance(record, dict) else {}
    return {}


def load_datasets(task: str, data, tokenizer, max_len: int, seed: int) -> tuple[Dataset, Dataset]:
    """Train and validation sets for ``task`` from ``data`` (a ``DataArgs``)."""
    if task == "sequence-classification":
        schema = {"text": str, "label": (str, int)}
        records = read_jsonl(data.train_path, schema) if data.train_path else pydoc_topics(data.min_per_topic)
        source = str(data.train_path or "pydoc-topics")
    else:
        if data.train_path is None:
            raise ValueError("task 'causal-lm' needs data.train_path: a JSONL file of instruction/input/output"
                             " records or of chat records ({\"messages\": [...]})")  # fmt: skip
        chat = "messages" in _first_record(data.train_path)
        schema = {"messages": list} if chat else {"instruction": str, "output": str}
        records, source = read_jsonl(data.train_path, schema), str(data.train_path)
    if data.val_path:
        train, val = records, read_jsonl(data.val_path, schema)
    else:
        train, val = split(records, data.val_fraction, seed, stratify=task == "sequence-classification")
    if task == "causal-lm":
        encode = encode_chat if chat else encode_instruction
        train_set = encode(train, tokenizer, max_len, source)
        val_set = encode(val, tokenizer, max_len, str(data.val_path or source))
        return (pack(train_set, max_len), val_set) if getattr(data, "packing", False) else (train_set, val_set)
    labels = sorted({str(r["label"]) for r in train})
    if len(labels) < 2:
        raise ValueError(
            f"{source}: every training example has the label {labels[0]!r}; classification needs at least 2 labels"
            " (with one, the model would learn a constant and report 100 % accuracy)"
        )
    val_source = str(data.val_path or f"{source} (held-out split)")
    return (
        encode_classification(train, tokenizer, max_len, labels, source),
        encode_classification(val, tokenizer, max_len, labels, val_source),
    )


def collate(examples: list[dict[str, list[int]]], pad_id: int, task: str, multiple: int = 1,
            limit: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Right-pad to the longest example, rounded up to a ``multiple`` of tokens (at most ``limit``, unless an
    example is longer); classification labels are one id per example."""
    longest = max(len(e["input_ids"]) for e in examples)
    width = -(-longest // multiple) * multiple
    if limit is not None:
        width = max(longest, min(width, limit))
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    if task == "sequence-classification":
        labels = torch.tensor([e["labels"][0] for e in examples])
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_micro_batches(n: int, micro: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches (example indices) of one epoch: a permutation seeded by (seed, epoch), sharded
    so every rank gets the same number of full micro-batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_rank = (n // world) // micro * micro
    mine = order[rank::world][:per_rank]
    return [mine[i : i + micro] for i in range(0, per_rank, micro)]


def eval_batches(n: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """Every example exactly once over all ranks, the same number of batches on each (the last may be short or
    empty: a sharded model's forward is collective, so every rank must run as many)."""
    mine = list(range(rank, n, world))
    return [mine[i : i + micro] for i in range(0, -(-n // world), micro)]
