"""Run by tests/test_distributed.py under torchrun x2 on CPU (gloo): whisper-ft's evaluation (loss only:
generation is refused with sharded weights) and export on a model sharded with FSDP2 (torch's fully_shard,
as accelerate applies it for fsdp_version 2: one unit per encoder/decoder layer, then the root). accelerate itself runs FSDP only on GPUs, so the sharding is applied
here by hand, and whisper_ft.sharding.is_sharded is told so; everything after that is whisper-ft's code.

argv: tiny model folder, output folder. Rank 0 writes result.json there.
"""

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from whisper_ft import checkpoint, sharding
from whisper_ft.collate import Collator
from whisper_ft.evaluation import evaluate
from whisper_ft.languages import resolve
from whisper_ft.model import load_whisper

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
accelerator = Accelerator()
rank, world = accelerator.process_index, accelerator.num_processes
processor, model = load_whisper(str(model_dir), resolve("en"), "transcribe", cache_dir=None, token=None)
model.eval()
collate = Collator(model.config.decoder_start_token_id)
g = torch.Generator().manual_seed(0)
texts = ["the cat sat", "a dog ran home", "hello world", "good morning to you", "one two three"]
samples = [{"id": f"s{i}", "seconds": 1.0, "labels": processor.tokenizer(t).input_ids,
            "input_features": torch.randn(model.config.num_mel_bins, 3000, generator=g).numpy()}
           for i, t in enumerate(texts)]
mine = samples[rank::world]  # 3 samples on rank 0 (2 batches), 2 on rank 1 (1 batch): uneven, as in real shards
loader = [collate(mine[i:i + 2]) for i in range(0, len(mine), 2)]

plain_metrics, plain_rows, _ = evaluate(model, loader, processor.tokenizer, accelerator, generate_kwargs=None)

sharded = copy.deepcopy(model)
for layer in [*sharded.model.encoder.layers, *sharded.model.decoder.layers]:
    fully_shard(layer)
fully_shard(sharded)
sharding.is_sharded = lambda accelerator: True  # what accelerate reports under FSDP
metrics, rows, _ = evaluate(sharded, loader, processor.tokenizer, accelerator, generate_kwargs=None)

# accelerator.get_state_dict(model) for FSDP2 is this call (full, gathered, on rank 0's CPU), made on every rank
full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if accelerator.is_main_process:
    checkpoint.export_model(sharded, processor, out / "model", full)
    json.dump({"plain": [plain_metrics, plain_rows], "sharded": [metrics, rows],
               "type": type(sharded).__name__}, open(out / "result.json", "w"))
accelerator.wait_for_everyone()
# Join gloo's threads now: left to the interpreter's exit, one was once destroyed while still running
# ("terminate called without an active exception", SIGABRT), failing the run after its work was done.
torch.distributed.destroy_process_group()
