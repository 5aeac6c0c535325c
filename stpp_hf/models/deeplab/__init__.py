"""DeepLabV3+ / DeepLabV2 for ST / ST++. A flat folder on purpose: saved models carry it as remote code."""
