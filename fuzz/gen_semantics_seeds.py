"""Write the seeds of the `store_semantics` fuzz target under fuzz/seeds/store_semantics/.

    python3 fuzz/gen_semantics_seeds.py

Standard library only (gen_seeds.py calls it too, after clearing fuzz/seeds/). The input of
the target is not a file but a program for fuzz/src/semantics.rs: a store to write, then
manifest edits; each seed here is one such program. Deterministic output.
"""

from __future__ import annotations

from pathlib import Path

SEEDS = Path(__file__).resolve().parent / "seeds" / "store_semantics"

# Index of each dtype in DType::ALL.
U8, BF16, I32, F32, I64 = 1, 8, 9, 11, 12


def tensor(dtype: int, dims: list[int], seed: int, big: int | None = None) -> bytes:
    """One tensor of `build`: dtype, number of dimensions, each dimension minus one,
    the u16 that sizes a tensor over two checksum chunks (flags 2, 16, 32, 64; first tensor), a
    seed."""
    out = bytes([dtype, len(dims)]) + bytes(d - 1 for d in dims)
    if big is not None:
        out += big.to_bytes(2, "little")
    return out + bytes([seed])


def store(flags: int, units: list[list[bytes]]) -> bytes:
    out = bytes([flags, len(units) - 1])
    for ts in units:
        out += bytes([len(ts) - 1]) + b"".join(ts)
    return out


# An edit: the unit, the op (op % 32 < 28: a tensor edit, on tensors a and b; op % 32 >= 28:
# a manifest or unit edit, the one numbered op // 32), then what the op reads.
def tensor_edit(unit: int, op: int, a: int, b: int, *rest: int) -> bytes:
    return bytes([unit, op, a, b, *rest])


PLAIN = [
    [tensor(F32, [16, 16], 1), tensor(F32, [16, 16], 2), tensor(BF16, [8], 3)],
    [tensor(U8, [5], 4), tensor(I64, [3, 2], 5)],
]


def seeds() -> dict[str, bytes]:
    plain = store(0, PLAIN)
    coded = store(1 | 4, PLAIN)
    big = store(2 | 16 | 32 | 64, [[tensor(U8, [1], 6, big=777), tensor(U8, [16, 16], 7)], PLAIN[1]])
    return {
        "plain": plain,
        "swap_names_and_digests": plain + tensor_edit(0, 1, 0, 1),
        "swap_names_only": plain + tensor_edit(0, 0, 0, 1),
        "relabel_f32_as_i32": plain + tensor_edit(0, 3, 0, 0, 0, 1),
        "relabel_any": plain + tensor_edit(0, 4, 2, 0, F32),
        "shape_against_nbytes": plain + tensor_edit(1, 6, 1, 0, 2, 3, 7),
        "overlapping_offsets": plain + tensor_edit(0, 15, 1, 0),
        "offset_out_of_range": plain + tensor_edit(1, 12, 1, 0, 5),
        "wrong_digest": plain + tensor_edit(0, 20, 2, 0, *b"\x01\x23\x45\x67\x89\xab\xcd\xef"),
        "malformed_digest": plain + tensor_edit(0, 23, 0, 0, 1),
        "duplicate_name": plain + tensor_edit(0, 2, 0, 1),
        "swap_entries": plain + tensor_edit(0, 17, 0, 2),
        "old_store": plain + bytes([0, 28 + 32 * 1]) + tensor_edit(0, 22, 0, 0) + tensor_edit(0, 22, 1, 0),
        "unit_tensor_lists_swapped": plain + bytes([0, 28 + 32 * 4, 0]),
        "unit_checksum_changed": plain + bytes([1, 28 + 32 * 2]) + bytes(8),
        "coded_swap_names_and_digests": coded + tensor_edit(0, 1, 0, 1),
        "big_swap_names_and_digests": big + tensor_edit(0, 1, 0, 1),
        "big_plain": big,
        "names_repeat": store(8, PLAIN),
    }


def main() -> None:
    SEEDS.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (SEEDS / f"{name}.bin").write_bytes(data)
    print(f"store_semantics: {len(seeds())} seeds")


if __name__ == "__main__":
    main()
