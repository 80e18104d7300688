"""Quantization numerics shared by QAT and PTQ: ranges, fake quantization, observers, BatchNorm folding.

Built on maintained torch core ops (`torch.fake_quantize_per_channel_affine` and friends), never on the deprecated
`torch.ao.quantization` package.
"""
