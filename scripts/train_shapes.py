"""Train the built-in `shapes` model from scratch, on one CPU thread, and write it as a diffusers folder.

    python scripts/train_shapes.py                     # the shipped weights, into sdcli/weights/shapes
    python scripts/train_shapes.py --quick -o /tmp/s   # a smoke run of the same path (about a minute)

The full run took 1,540 s of CPU (1,639 s wall on the shared 2-core machine) and made the shipped weights bit
for bit; it ends with the picture check (sdcli.shapes.matches on EXAMPLES × EVAL_SEEDS), written with the
settings and times to the folder's training.json.

Stable Diffusion 1.x in miniature, trained as SD was, with diffusers' own pieces: an AutoencoderKL (4× down,
4 latent channels) first, for reconstruction (L1 + a small KL term, as diffusers' train_autoencoderkl.py), its
latents scaled to unit spread (`scaling_factor`); then a UNet2DConditionModel with cross-attention on a CLIP text
encoder, trained together on the VAE's latents of pictures drawn here (sdcli.shapes) with DDPMScheduler.add_noise
and v-prediction on a zero-terminal-SNR schedule (so a flat colour can come out of pure noise; sampled with
Euler, trailing timesteps), 10 % of captions dropped for classifier-free guidance, and an EMA of the weights
(diffusers' EMAModel). The tokenizer is CLIP's, with a word-level vocabulary built in code. Every setting and
the seed are below; the same settings should reproduce the quality, not necessarily the bits, on another machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdcli import shapes  # noqa: E402

SEED = 0
SETTINGS = {
    "vae_steps": 700, "vae_batch": 16, "vae_lr": 1e-3, "kl_weight": 1e-6, "vae_init_logvar": -6.0,
    "pool": 8192, "unet_steps": 2400, "unet_batch": 32, "unet_lr": 1e-3, "warmup": 200, "ema_decay": 0.999,
    "caption_dropout": 0.1, "size_in_caption": 0.5, "position_in_caption": 0.5,
}
QUICK = {"vae_steps": 30, "pool": 256, "unet_steps": 60, "warmup": 10}
MAX_TOKENS = 16  # the longest caption is 14 tokens with <|startoftext|> and <|endoftext|>

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS, "projection_dim": 64, "hidden_act": "quick_gelu"}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 32, 64),
       "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
       "layers_per_block": 1, "norm_num_groups": 8, "sample_size": shapes.SIZE}
# SD 1.x's layout in miniature: cross-attention in every block but the deepest, 16×16 latents
UNET = {"sample_size": shapes.SIZE // 4, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64, 64),
        "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": TEXT["hidden_size"], "attention_head_dim": 2, "norm_num_groups": 8}
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
# the seeds the training is judged on, with sdcli.shapes.EXAMPLES (tests/test_shapes.py uses others)
EVAL_SEEDS = (1, 2)


def word_vocabulary() -> tuple[dict, list]:
    """CLIP's byte-level alphabet (so that any prompt tokenizes) and BPE merges that make each word of the
    vocabulary one token. Merges are added word by word at the lowest priority, joining what the earlier merges
    leave of the word, so that no merge breaks a word merged before it."""
    from sdcli.models import _byte_alphabet

    symbols = _byte_alphabet()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []
    for word in shapes.WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:  # BPE as the tokenizer runs it: the highest-priority known pair first
            ranked = [(merges.index(p), i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in merges]
            i = min(ranked)[1] if ranked else 0
            if not ranked:
                merges.append((pieces[0], pieces[1]))
            pieces[i:i + 2] = ["".join(pieces[i:i + 2])]
            vocab.setdefault(pieces[i], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def word_tokenizer():
    """CLIP's tokenizer on the word vocabulary, checked: every word is one token."""
    from transformers import CLIPTokenizer

    vocab, merges = word_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    for word in shapes.WORDS:
        assert len(tokenizer(word).input_ids) == 3, f"{word!r} is not one token"
    return tokenizer


def halve_weights(folder: Path) -> None:
    """Store every weight file as fp16 (configs untouched, so the pipeline still loads in fp32): half the bytes
    in the package and in each carry to the GPU machine, the same pictures (64 of 64 right either way; at most
    10/255 apart, median 1)."""
    import torch
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.rglob("*.safetensors")):
        tensors = load_file(path)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, path,
                  metadata={"format": "pt"})


def save_vocabulary_files(folder: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json: transformers 4's CLIPTokenizer reads only those."""
    vocab, merges = word_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def scene_caption(scene: dict, rng: random.Random, s: dict) -> str:
    """The scene's caption, with its size and position each said or left out (the picture has them anyway)."""
    if rng.random() < s["caption_dropout"]:
        return ""
    return shapes.caption(scene["colour"], scene["shape"], scene["background"],
                          scene["size"] if rng.random() < s["size_in_caption"] else None,
                          scene["position"] if rng.random() < s["position_in_caption"] else None)


def schedule_lr(optimizer, base: float, step: int, steps: int, warmup: int) -> None:
    """Linear warm-up, then cosine down to 10 %."""
    progress = max(0.0, (step - warmup) / max(1, steps - warmup))
    factor = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in optimizer.param_groups:
        group["lr"] = base * factor


def busy_pictures(n: int, rng: random.Random):
    """Pictures for the VAE alone, which needs no captions: several shapes of any colour, size and place on one
    background, so that every picture holds many edges and colour pairs to learn from."""
    import torch

    pictures = []
    for _ in range(n):
        picture = shapes.rgb(rng.choice(sorted(shapes.COLOURS))).expand(3, shapes.SIZE, shapes.SIZE)
        for _ in range(rng.randint(1, 4)):
            radius = rng.uniform(shapes.SIZES["small"][0], shapes.SIZES["big"][1])
            inside = shapes.coverage(rng.choice(shapes.SHAPES), radius, rng.uniform(0, shapes.SIZE),
                                     rng.uniform(0, shapes.SIZE))
            picture = inside * shapes.rgb(rng.choice(sorted(shapes.COLOURS))) + (1 - inside) * picture
        pictures.append(picture)
    return torch.stack(pictures)


def train_vae(s: dict, rng: random.Random, log):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE)
    with torch.no_grad():  # start with a small posterior spread: noise of spread 1 would drown the latents at first
        vae.quant_conv.bias[VAE["latent_channels"]:] = s["vae_init_logvar"]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=s["vae_lr"], weight_decay=0.0)
    for step in range(s["vae_steps"]):
        schedule_lr(optimizer, s["vae_lr"], step, s["vae_steps"], s["warmup"])
        x = busy_pictures(s["vae_batch"], rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = torch.nn.functional.l1_loss(recon, x) + s["kl_weight"] * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == s["vae_steps"] - 1:
            log(f"vae step {step}: mse {mse.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD's scaling_factor: latents of unit spread (0.18215 for SD 1.x's VAE)
        x = shapes.draw([shapes.sample(rng) for _ in range(256)], rng)
        latents = vae.encode(x).latent_dist.mean
        vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
        recon = vae.decode(latents).sample
    log(f"vae: scaling_factor {vae.config.scaling_factor}, reconstruction mse {torch.mean((recon - x) ** 2):.5f}")
    return vae


def encode_pool(vae, s: dict, rng: random.Random):
    """`pool` random scenes, drawn and encoded once: their latent distributions (mean and spread), from which each
    training step samples, as SD's training samples the VAE's posterior."""
    import torch

    scenes = [shapes.sample(rng) for _ in range(s["pool"])]
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(scenes), 64):
            posterior = vae.encode(shapes.draw(scenes[start:start + 64], rng)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return scenes, torch.cat(means), torch.cat(stds)


def train_unet(vae, tokenizer, s: dict, rng: random.Random, log):
    import torch
    import transformers
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT))
    unet = UNet2DConditionModel(**UNET)
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s["unet_lr"], weight_decay=0.01)
    ema = EMAModel(params, decay=s["ema_decay"], use_ema_warmup=True, power=3 / 4, foreach=True)
    unet.train()
    text_encoder.train()
    scenes, means, stds = encode_pool(vae, s, rng)
    for step in range(s["unet_steps"]):
        schedule_lr(optimizer, s["unet_lr"], step, s["unet_steps"], s["warmup"])
        batch = torch.randint(0, len(scenes), (s["unet_batch"],))
        latents = (means[batch] + stds[batch] * torch.randn_like(means[batch])) * vae.config.scaling_factor
        ids = tokenizer([scene_caption(scenes[i], rng, s) for i in batch.tolist()], padding="max_length",
                        truncation=True, max_length=MAX_TOKENS, return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(params)
        if step % 100 == 0 or step == s["unet_steps"] - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    ema.copy_to(params)
    return unet.eval(), text_encoder.eval()


def judge(pipe, log) -> float:
    """The share of shapes.EXAMPLES × EVAL_SEEDS whose picture has the shape and background colours asked for."""
    import torch

    passed = 0
    for prompt in shapes.EXAMPLES:
        for seed in EVAL_SEEDS:
            image = pipe(prompt, num_inference_steps=30, generator=torch.Generator().manual_seed(seed),
                         output_type="np").images[0]
            ok = shapes.matches(image, prompt)
            passed += ok
            if not ok:
                log(f"  miss: {prompt!r} seed {seed}: {shapes.colours(image)}")
    rate = passed / (len(shapes.EXAMPLES) * len(EVAL_SEEDS))
    log(f"picture check: {passed}/{len(shapes.EXAMPLES) * len(EVAL_SEEDS)} ({rate:.0%})")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=shapes.FOLDER, help="where the diffusers folder goes")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage: a smoke run")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    s = {**SETTINGS, **(QUICK if args.quick else {})}
    start, cpu = time.time(), time.process_time()

    def log(text):
        print(f"[{time.time() - start:6.0f} s wall, {time.process_time() - cpu:6.0f} s cpu] {text}", flush=True)

    from sdcli.models import quiet_libraries

    quiet_libraries()
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    tokenizer = word_tokenizer()
    vae = train_vae(s, rng, log)
    unet, text_encoder = train_unet(vae, tokenizer, s, rng, log)
    scheduler = EulerDiscreteScheduler(**SCHEDULE, steps_offset=1)
    # for the schedulers made from this config (sdcli's --scheduler): DDIM would otherwise clip its x0 estimate to
    # [-1, 1], which these latents exceed, as SD 1.x's own config says
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rate = judge(pipe, log)
    pipe.save_pretrained(args.output)
    halve_weights(args.output)
    save_vocabulary_files(args.output / "tokenizer")
    (args.output / "training.json").write_text(json.dumps(
        {"seed": SEED, "settings": s, "quick": args.quick, "picture_check": rate,
         "wall_seconds": round(time.time() - start), "cpu_seconds": round(time.process_time() - cpu),
         "torch": torch.__version__}, indent=2) + "\n")
    log(f"written to {args.output}")


if __name__ == "__main__":
    main()
