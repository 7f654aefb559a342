"""Trains denoised's default model: a tiny FLUX-architecture text-to-image model on the procedural
shapes dataset (dataset.json), saved as a diffusers FluxPipeline folder.

Phases (each one reads the previous phases' outputs from --work, so they can be rerun separately):
  components   tokenizers from the dataset vocabulary; random, frozen CLIP + T5 text encoders
  vae          AutoencoderKL (FLUX-style, no quant convs) on dataset images; held-out PSNR
  latents      the latents of every prompt's image -> shift_factor / scaling_factor; cached with the
               text embeddings of every prompt (computed by FluxPipeline.encode_prompt)
  transformer  FluxTransformer2DModel, rectified flow exactly as FluxPipeline samples it
  assemble     the diffusers folder (--out), reloaded with FluxPipeline.from_pretrained and run once

Deterministic given --seed: fixed torch / numpy seeds, data indices and noise drawn from seeded
generators, two CPU threads (the thread count can change float summation order, so the results are
bit-identical for the same torch build and thread count). `make_default.sh` runs it end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

# Waiting OpenMP threads must sleep, not spin: on a shared machine a spinning thread waits for a
# descheduled peer, and a 2-thread step got 4x slower than a 1-thread one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import components as C  # noqa: E402
import dataset  # noqa: E402

PHASES = ("components", "vae", "latents", "transformer", "assemble")
# Dataset seeds of the VAE's disjoint image sets (examples are a function of (seed, index)).
VAE_TRAIN_SET, VAE_HELDOUT_SET = 1, 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def vae_images(set_seed: int, indices) -> torch.Tensor:
    """VAE training / held-out images: random prompts with randomised shape size and offset."""
    examples = [dataset.dataset_example(set_seed, int(i), augment=True) for i in indices]
    return torch.from_numpy(dataset.render_batch(examples))


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Run:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "train_log.json"
        self.record = json.loads(self.log_path.read_text()) if self.log_path.exists() else {}

    def save_record(self, phase: str, **values) -> None:
        self.record[phase] = values
        self.log_path.write_text(json.dumps(self.record, indent=2))

    # ------------------------------------------------------------------------------------------------
    def components(self):
        out = self.work / "components"
        if out.exists():
            shutil.rmtree(out)
        clip_tok = C.build_clip_tokenizer(out / "tokenizer")
        t5_tok = C.build_t5_tokenizer(out / "tokenizer_2")
        clip, t5 = C.new_text_encoders(self.args.seed, len(clip_tok), len(t5_tok))
        clip.save_pretrained(str(out / "text_encoder"))
        C.prefix_clip_weights(out / "text_encoder")
        t5.save_pretrained(str(out / "text_encoder_2"))
        self.save_record("components", clip_vocab=len(clip_tok), t5_vocab=len(t5_tok),
                         vocabulary=dataset.vocabulary())
        log(f"tokenizers: CLIP {len(clip_tok)} tokens, T5 {len(t5_tok)} pieces; text encoders saved")

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def vae_psnr(self, vae, n: int = 256) -> dict:
        """PSNR (dB, images in [0, 1]) of posterior-mean reconstructions of held-out images: of the
        pooled MSE, and the mean and minimum per image."""
        vae.eval()
        mses = []
        for start in range(0, n, 64):
            x = vae_images(VAE_HELDOUT_SET, range(start, min(start + 64, n)))
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            mses.append(((rec - x) / 2).pow(2).flatten(1).mean(1))
        mse = torch.cat(mses)
        per_image = -10 * torch.log10(mse.clamp_min(1e-10))
        vae.train()
        return {"psnr_pooled": float(-10 * torch.log10(mse.mean())), "psnr_mean": float(per_image.mean()),
                "psnr_min": float(per_image.min())}

    def vae(self):
        a = self.args
        torch.manual_seed(a.seed)
        vae = C.new_vae(a.seed).train()
        opt = torch.optim.Adam(vae.parameters(), lr=a.vae_lr, betas=(0.9, 0.99))
        gen = torch.Generator().manual_seed(a.seed)  # posterior samples
        crop_rng = np.random.default_rng(a.seed)
        t0, history, seen = time.time(), [], 0
        for step in range(a.vae_steps):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, a.vae_steps, a.vae_lr, warmup=50)
            # Most steps see random 32x32 crops (4x cheaper, the model is convolutional); the last
            # ones whole images, so the group norms settle on full-image statistics.
            crop = step < a.vae_steps - a.vae_full_steps
            batch = a.vae_batch if crop else a.vae_batch // 2
            x = vae_images(VAE_TRAIN_SET, range(seen, seen + batch))
            seen += batch
            if crop:
                offsets = crop_rng.integers(0, dataset.IMAGE_SIZE - 32 + 1, size=(batch, 2))
                x = torch.stack([img[:, oy:oy + 32, ox:ox + 32] for img, (oy, ox) in zip(x, offsets)])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                posterior = vae.encode(x).latent_dist
                z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
                rec = vae.decode(z).sample.float()
            # L1 keeps edges sharp, MSE is what PSNR measures; a weak KL keeps latents bounded and the
            # decoder tolerant of small latent errors (which the diffusion model will make).
            l1, mse = (rec - x).abs().mean(), (rec - x).pow(2).mean()
            mean, logvar = posterior.mean.float(), posterior.logvar.float()
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
            loss = l1 + mse + a.vae_kl * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            history.append([l1.item(), mse.item(), kl.item()])
            if (step + 1) % 50 == 0 or step + 1 == a.vae_steps:
                h = np.mean(history[-50:], axis=0)
                log(f"vae step {step + 1}/{a.vae_steps} l1 {h[0]:.4f} mse {h[1]:.5f} kl {h[2]:.2f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} ({time.time() - t0:.0f}s)")
            if (step + 1) % 250 == 0 and step + 1 < a.vae_steps:
                log(f"vae held-out {self.vae_psnr(vae, 64)}")
        seconds = time.time() - t0
        psnr = self.vae_psnr(vae)
        log(f"vae done in {seconds:.0f}s; held-out reconstruction {psnr}")
        vae.eval().save_pretrained(str(self.work / "vae"))
        final = np.mean(history[-50:], axis=0)
        self.save_record("vae", seconds=round(seconds, 1), steps=a.vae_steps, full_image_steps=a.vae_full_steps,
                         batch=a.vae_batch, lr=a.vae_lr, kl_weight=a.vae_kl, final_l1=float(final[0]),
                         final_mse=float(final[1]), final_kl=float(final[2]), heldout_images=256, **psnr)

    # ------------------------------------------------------------------------------------------------
    def text_pipeline(self):
        """A FluxPipeline with only the text side, so prompts are encoded by diffusers' own code."""
        from diffusers import FluxPipeline
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        comp = self.work / "components"
        return FluxPipeline(scheduler=C.new_scheduler(), vae=None, transformer=None,
                            text_encoder=CLIPTextModel.from_pretrained(str(comp / "text_encoder")).eval(),
                            tokenizer=CLIPTokenizer.from_pretrained(str(comp / "tokenizer")),
                            text_encoder_2=T5EncoderModel.from_pretrained(str(comp / "text_encoder_2")).eval(),
                            tokenizer_2=T5TokenizerFast.from_pretrained(str(comp / "tokenizer_2")))

    @torch.no_grad()
    def latents(self):
        from diffusers import AutoencoderKL

        t0 = time.time()
        vae = AutoencoderKL.from_pretrained(str(self.work / "vae")).eval()
        examples = dataset.prompt_examples()  # one image per prompt, in prompt order
        means, mses = [], []
        for start in range(0, len(examples), 96):
            x = torch.from_numpy(dataset.render_batch(examples[start:start + 96]))
            z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample.clamp(-1, 1)
            means.append(z)
            mses.append(((rec - x) / 2).pow(2).flatten(1).mean(1))
        z = torch.cat(means)
        mse = torch.cat(mses)
        psnr = {"psnr_pooled": float(-10 * torch.log10(mse.mean())),
                "psnr_min": float(-10 * torch.log10(mse.max()))}
        # diffusers' convention (FluxPipeline): latents = (z - shift_factor) * scaling_factor.
        shift, scale = float(z.mean()), float(1.0 / z.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        vae.save_pretrained(str(self.work / "vae"))

        prompts = [ex.prompt for ex in examples]
        pipe = self.text_pipeline()
        t5, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=torch.device("cpu"),
                                           max_sequence_length=C.MAX_SEQUENCE_LENGTH)
        torch.save({"x0": (z - shift) * scale, "t5": t5, "pooled": pooled, "prompts": prompts},
                   self.work / "latents.pt")
        shutil.rmtree(self.work / "transformer_checkpoints", ignore_errors=True)  # trained on old latents
        seconds = time.time() - t0
        # How distinct the frozen encoders keep the prompts (spread across prompts / overall spread).
        spread = {"t5": float(t5.std(0).mean() / t5.std()), "pooled": float(pooled.std(0).mean() / pooled.std())}
        log(f"latents: {tuple(z.shape)} shift {shift:.4f} scale {scale:.4f}; reconstruction of the prompt "
            f"images {psnr}; text spread {spread} ({seconds:.0f}s)")
        self.save_record("latents", seconds=round(seconds, 1), images=len(examples), shift_factor=shift,
                         scaling_factor=scale, latent_shape=list(z.shape[1:]), text_spread=spread,
                         prompt_images_reconstruction=psnr)

    # ------------------------------------------------------------------------------------------------
    def transformer(self):
        """Rectified-flow training. The learning rate is constant after warm-up (the EMA does the
        averaging), so the run is a pure function of the step count: a checkpoint every
        --checkpoint-every steps holds the whole state (weights, EMA, optimizer, generator, data
        order), and a longer run resumes from it with exactly the result of running from scratch."""
        from diffusers import FluxPipeline

        a = self.args
        data = torch.load(self.work / "latents.pt")
        x0_all, t5_all, pooled_all = data["x0"], data["t5"], data["pooled"]  # row i = prompt i
        n, c, h, w = x0_all.shape
        torch.manual_seed(a.seed)
        model = C.new_transformer(a.seed).train()
        ema = C.new_transformer(a.seed).eval()
        ema.load_state_dict(model.state_dict())
        for p in ema.parameters():
            p.requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
        gen = torch.Generator().manual_seed(a.seed + 1)
        order, cursor, start, history, seconds_before = torch.randperm(n, generator=gen), 0, 0, [], 0.0

        ckpt_dir = self.work / "transformer_checkpoints"
        ckpt_dir.mkdir(exist_ok=True)
        ckpts = sorted((int(p.stem.split("_")[1]), p) for p in ckpt_dir.glob("step_*.pt"))
        ckpts = [(k, p) for k, p in ckpts if k <= a.steps]
        if ckpts and not a.restart:
            start, path = ckpts[-1]
            state = torch.load(path, weights_only=False)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            order, cursor, history, seconds_before = state["order"], state["cursor"], state["history"], state["seconds"]
            log(f"resumed from {path} (step {start})")

        # Exactly the ids FluxPipeline builds: (0, row, col) per packed latent, zeros for the text.
        img_ids = FluxPipeline._prepare_latent_image_ids(a.batch, h // 2, w // 2, torch.device("cpu"), torch.float32)
        txt_ids = torch.zeros(t5_all.shape[1], 3)
        shift = C.SCHEDULER_CONFIG["shift"]
        t0 = time.time()
        for step in range(start, a.steps):
            for g in opt.param_groups:
                g["lr"] = a.lr * min(1.0, (step + 1) / 100)
            if cursor + a.batch > n:  # reshuffle each epoch, from the seeded generator
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + a.batch]
            cursor += a.batch
            x0 = FluxPipeline._pack_latents(x0_all[idx], a.batch, c, h, w)
            noise = torch.randn(x0.shape, generator=gen)
            # sigma through the scheduler's own shift (FlowMatchEulerDiscreteScheduler, static shift).
            u = torch.rand(a.batch, generator=gen)
            sigma = shift * u / (1 + (shift - 1) * u)
            s = sigma[:, None, None]
            xt = (1 - s) * x0 + s * noise
            # bf16 autocast: about twice as fast on this CPU; weights, optimizer and EMA stay fp32.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = model(hidden_states=xt, timestep=sigma, guidance=None,
                             pooled_projections=pooled_all[idx], encoder_hidden_states=t5_all[idx],
                             txt_ids=txt_ids, img_ids=img_ids,
                             return_dict=False)[0]
            # Target: the velocity the Euler scheduler integrates (optionally weighted by sigma^2, i.e.
            # the error of the implied clean image x0 = x_t - sigma * v; it did not help here).
            err = (pred.float() - (noise - x0)).pow(2).mean(dim=(1, 2))
            loss = (err * sigma.pow(2)).mean() if a.x0_weighting else err.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            decay = min(a.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            history.append(loss.item())
            if (step + 1) % 50 == 0 or step + 1 == a.steps:
                log(f"transformer step {step + 1}/{a.steps} loss {np.mean(history[-50:]):.4f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} ({time.time() - t0:.0f}s)")
            if (step + 1) % a.checkpoint_every == 0 or step + 1 == a.steps:
                torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                            "gen": gen.get_state(), "order": order, "cursor": cursor, "history": history,
                            "seconds": seconds_before + time.time() - t0}, ckpt_dir / f"step_{step + 1:06d}.pt")
        seconds = seconds_before + time.time() - t0
        ema.save_pretrained(str(self.work / "transformer"))
        final = float(np.mean(history[-200:]))
        self.save_record("transformer", seconds=round(seconds, 1), steps=a.steps, batch=a.batch, lr=a.lr,
                         ema=a.ema, x0_weighting=a.x0_weighting, final_loss=final,
                         params=sum(p.numel() for p in ema.parameters()))
        log(f"transformer done: {a.steps} steps, {seconds:.0f}s of training in all, final loss {final:.4f}")

    # ------------------------------------------------------------------------------------------------
    def assemble(self):
        from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

        out = Path(self.args.out)
        if out.exists():
            shutil.rmtree(out)
        text = self.text_pipeline()
        pipe = FluxPipeline(scheduler=C.new_scheduler(), text_encoder=text.text_encoder, tokenizer=text.tokenizer,
                            text_encoder_2=text.text_encoder_2, tokenizer_2=text.tokenizer_2,
                            vae=AutoencoderKL.from_pretrained(str(self.work / "vae")),
                            transformer=FluxTransformer2DModel.from_pretrained(str(self.work / "transformer")))
        pipe.save_pretrained(str(out), safe_serialization=True)
        C.prefix_clip_weights(out / "text_encoder")
        # The folder is self-describing: tokenizers as built (save_pretrained may rewrite them).
        for name in ("tokenizer", "tokenizer_2"):
            shutil.rmtree(out / name)
            shutil.copytree(self.work / "components" / name, out / name)
        # Serving defaults for the denoised server (diffusers ignores the file; FluxPipeline would
        # default to 1024x1024). The T5 budget is tokenizer_2's model_max_length.
        d = dataset.DEFAULTS
        (out / "denoised.json").write_text(json.dumps(
            {"width": d["width"], "height": d["height"], "steps": d["num_inference_steps"]}, indent=2) + "\n")
        shutil.copy(self.log_path, out / "train_log.json")
        self.write_model_card(out)

        # It must load and run as a plain diffusers folder.
        reloaded = FluxPipeline.from_pretrained(str(out))
        reloaded.set_progress_bar_config(disable=True)
        image = reloaded(dataset.eval_pairs()[0]["prompt"], height=d["height"], width=d["width"],
                         num_inference_steps=d["num_inference_steps"], max_sequence_length=d["max_sequence_length"],
                         generator=torch.Generator("cpu").manual_seed(0)).images[0]
        image.save(self.work / "assemble_check.png")
        log(f"assembled {out} ({C.folder_size_mb(out):.2f} MB); FluxPipeline.from_pretrained ran it")

    def write_model_card(self, out: Path) -> None:
        d, latents = dataset.DEFAULTS, self.record.get("latents", {})
        psnr = self.record.get("vae", {}).get("psnr_pooled", float("nan"))
        vae = (f"shift_factor {latents.get('shift_factor', float('nan')):.6f}, scaling_factor "
               f"{latents.get('scaling_factor', float('nan')):.6f}, held-out PSNR {psnr:.2f} dB")
        sizes = {p.parent.name: round(p.stat().st_size / 2**20, 2) for p in sorted(out.rglob("*.safetensors"))}
        call = (f'pipe("a red circle at the top left on a blue background", height={d["height"]}, '
                f'width={d["width"]},\n             num_inference_steps={d["num_inference_steps"]}, '
                f'max_sequence_length={d["max_sequence_length"]}).images[0]')
        card = f"""# denoised default model

A tiny FLUX-architecture text-to-image model (diffusers `FluxPipeline` layout) trained by
`server/train/train_default.py` on the procedural shapes dataset of `server/train/dataset.json`
("a red circle at the top left on a blue background"). Schnell-style: no guidance embedding, no CFG.
Provenance: `train_log.json`; serving defaults for denoised: `denoised.json`.

| setting | value |
|---|---|
| size | {d['width']}x{d['height']} (the only size it was trained at) |
| steps | {d['num_inference_steps']} |
| max_sequence_length (T5) | {d['max_sequence_length']} (also `tokenizer_2` model_max_length; 512 breaks it) |
| scheduler | FlowMatchEulerDiscreteScheduler, shift {C.SCHEDULER_CONFIG['shift']}, no dynamic shifting |
| VAE | {vae} |
| weights (MB, fp32) | {json.dumps(sizes)} |

```python
from diffusers import FluxPipeline
pipe = FluxPipeline.from_pretrained("models/default")
image = {call}
```

Check: `python server/train/evaluate.py --model models/default --pairs 50`.
"""
        (out / "README.md").write_text(card)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="out/train_default", help="intermediate outputs")
    p.add_argument("--out", default="models/default", help="the diffusers folder to write")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=1250)
    p.add_argument("--vae-full-steps", type=int, default=250, help="last steps on whole images (batch / 2)")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1.5e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--x0-weighting", action="store_true",
                   help="weight the velocity MSE by sigma^2 (the implied x0 error) instead of plain MSE")
    p.add_argument("--restart", action="store_true", help="ignore transformer checkpoints in --work")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    run = Run(args)
    for phase in args.phases.split(","):
        if phase not in PHASES:
            raise SystemExit(f"unknown phase {phase!r}; phases: {PHASES}")
        log(f"phase {phase}")
        getattr(run, phase)()


if __name__ == "__main__":
    main()
