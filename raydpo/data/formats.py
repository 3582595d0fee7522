"""What a raw preference row must look like (standard rows with an explicit prompt)."""

from __future__ import annotations

from typing import Optional

TEXT_FIELDS = ("prompt", "chosen", "rejected")


def row_error(row: dict) -> Optional[str]:
    """Why a raw row cannot be trained on, or None."""
    for name in TEXT_FIELDS:
        value = row.get(name)
        if value is None:
            return f"field {name!r} is missing"
        if not isinstance(value, str):
            return f"field {name!r} must be a string, got {type(value).__name__}"
    return None


def check_rows(rows: list, split_name: str = "train_dataset") -> None:
    """Raise a ValueError naming the first bad row of an in-memory list (and how many are bad)."""
    errors = [(i, error) for i, row in enumerate(rows)
              if (error := row_error(row) if isinstance(row, dict) else f"expected a dict, got {type(row).__name__}")]
    if errors:
        index, error = errors[0]
        raise ValueError(f"{split_name} row {index}: {error} ({len(errors)} bad row(s) of {len(rows)})")
