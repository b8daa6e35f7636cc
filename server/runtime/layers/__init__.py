"""The layers a gated or low-rank ViT is assembled from: routing state, gated (expert-mixing) layers,
low-rank-delta linear layers."""
