"""What a quantization is: bit widths, grouping and symmetry of weights and activations."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from quantcli.errors import SpecError

SUPPORTED_WBITS = range(2, 9)
SUPPORTED_ABITS = (4, 6, 8, 16)
COMMON_GROUPS = (16, 32, 64, 128, 256)  # the group sizes a refusal suggests, when they divide
SUPPORTED_KV_BITS = (4, 8, 16)


@dataclass(frozen=True)
class QuantSpec:
    """Weight (and optionally activation) quantization.

    wbits:  2..8 bits per weight.
    group:  number of consecutive input channels sharing one scale/zero; -1 = one per output row.
    sym:    symmetric codes (zero fixed at 2**(wbits-1)) or asymmetric (zero learned per group).
    abits:  16 = weight-only; 4/6/8 = fake-quant of every quantized linear's input.
    act_sym:    symmetric activation codes (no zero point) or asymmetric (per-token/tensor zero).
    act_static: one scale (and zero) per linear input, calibrated and stored in the artifact
                (``<linear>.input_scale`` / ``.input_zero``), instead of per-token dynamic ones.
    kv_bits:    16 = no KV-cache quantization; 8/4 = per-head, per-token fake quant of the keys
                (after RoPE) and values where attention reads them.
    """

    wbits: int = 4
    group: int = 128
    sym: bool = False
    abits: int = 16
    act_sym: bool = False
    act_static: bool = False
    kv_bits: int = 16

    def __post_init__(self) -> None:
        if self.wbits not in SUPPORTED_WBITS:
            raise SpecError(f"--wbits {self.wbits} is not supported: use 2..8 bits")
        if self.group != -1 and self.group < 1:
            raise SpecError(f"--group {self.group} is not valid: use a positive group size or -1 for per-channel")
        if self.abits not in SUPPORTED_ABITS:
            raise SpecError(f"--abits {self.abits} is not supported: use one of {', '.join(map(str, SUPPORTED_ABITS))}")
        if self.kv_bits not in SUPPORTED_KV_BITS:
            raise SpecError(f"--kv-bits {self.kv_bits} is not supported: use 8 or 4 (16 = off)")
        if self.act_static and self.abits >= 16:
            raise SpecError("--act-static needs quantized activations: add --abits 8 (or --w8a8, --w4a8, --w4a4)")

    @property
    def maxq(self) -> int:
        """Largest integer code: codes lie in [0, maxq]."""
        return 2**self.wbits - 1

    @property
    def weight_only(self) -> bool:
        return self.abits >= 16

    def group_for(self, in_features: int) -> int:
        """The group size for a linear with ``in_features`` inputs (per-channel → the whole row)."""
        return in_features if self.group == -1 else self.group

    def check_divides(self, in_features: int, where: str) -> None:
        """Refuse a group size that does not divide a linear's input dimension."""
        if self.group != -1 and in_features % self.group:
            divisors = [g for g in COMMON_GROUPS if in_features % g == 0][::-1]
            hint = f"try --group {' or '.join(map(str, divisors))}" if divisors else "use --group -1 (per channel)"
            raise SpecError(
                f"--group {self.group} does not divide the input dimension {in_features} of {where}: {hint}"
            )

    def label(self) -> str:
        g = "c" if self.group == -1 else str(self.group)
        act = "" if self.weight_only else f"a{self.abits}{'static' if self.act_static else ''}"
        kv = "" if self.kv_bits >= 16 else f"kv{self.kv_bits}"
        return f"w{self.wbits}{act}{kv}g{g}{'' if not self.sym else 's'}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        names = ("wbits", "group", "sym", "abits", "act_sym", "act_static", "kv_bits")
        return cls(**{k: data[k] for k in names if k in data})
