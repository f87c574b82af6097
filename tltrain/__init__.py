"""tltrain: distributed transfer learning for fundus images (DR grading)."""

__version__ = "0.1.0"


def load_pretrained(path, device: str = "cpu", num_classes: int | None = None, digest: str | None = None):
    """(model, preprocessing) from a package written by `tltrain export`; see tltrain.export. digest: the
    package digest its publisher printed (a package with another one is refused)."""
    from tltrain.export.load import load_pretrained as _load

    return _load(path, device=device, num_classes=num_classes, digest=digest)
