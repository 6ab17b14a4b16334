"""How many groups of four MaskLLM's initial logits already put off the prior's pattern at step 0.

    python bench/maskllm_prior_noise.py [--groups 200000] [--seed 0]

The logits start as noise (std ``init_std``) plus the prior's pull (``prior_strength`` x std per
pattern overlap; ``sparsekit.hf.maskllm.prior_logits``); the share of groups whose most likely
pattern is not the prior's is what a run changes before any training.
"""

from __future__ import annotations

import argparse

import torch

from sparsekit.hf.maskllm import PATTERNS_2_4, MaskLLMSettings, prior_logits


def off_prior_share(groups: int, seed: int, settings: MaskLLMSettings) -> float:
    """Share of ``groups`` random prior patterns that the initial logits' argmax does not pick."""
    g = torch.Generator().manual_seed(seed)
    prior = PATTERNS_2_4[torch.randint(0, 6, (groups,), generator=g)].bool()
    gate = prior_logits(prior.view(groups, 4), groups, settings, g)
    return float((PATTERNS_2_4[gate.argmax(-1)].bool() != prior).any(-1).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    settings = MaskLLMSettings()
    share = off_prior_share(args.groups, args.seed, settings)
    print(
        f"init_std {settings.init_std}, prior_strength {settings.prior_strength}: {100 * share:.1f}% of "
        f"{args.groups:,} groups start off the prior's pattern"
    )


if __name__ == "__main__":
    main()
