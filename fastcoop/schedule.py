"""The published CoOp schedule: epochs by shot count, one constant warm-up epoch, then cosine decay per epoch."""

import math


def published_epochs(shots: int | None, num_classes: int) -> int:
    """CoOp's scripts (COOP.md; configs rn50_ep50, rn50_ep100, rn50): 1 shot → 50 epochs, 2 and 4 → 100, 8 and
    more → 200; ImageNet-sized label sets (≥ 1000 classes) 50 for every shot count. The whole train split
    (shots None), which the paper does not schedule, gets 50."""
    if shots is None or num_classes >= 1000 or shots == 1:
        return 50
    return 100 if shots <= 4 else 200


def lr_at(epoch: int, epochs: int, lr: float, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """Learning rate of a 0-based epoch, as the published scheduler steps it (cosine with T_max = epochs,
    started after the constant warm-up, so the last epoch ends above zero)."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))
