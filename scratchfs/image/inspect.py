"""`scratchfs image inspect`: what an image holds, read through our own libsquashfs reader."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Any

from ..errors import NotFoundError
from ..units import format_size
from .manifest import ManifestError, check_image, read_manifest

log = logging.getLogger(__name__)


def inspect_image(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-able description of the image at *path* (walks every inode for the counts)."""
    from ..squashfs import Image

    if not os.path.lexists(path):
        raise NotFoundError(f"{path}: no such image")
    with Image.open(path) as img:
        info = img.info
        files = dirs = symlinks = other = hardlinks = 0
        logical = 0
        seen: set[int] = set()
        for rel, ino in img.walk():
            if not rel:
                continue
            if ino.is_dir:
                dirs += 1
            elif ino.is_file:
                if ino.ino in seen:
                    hardlinks += 1
                    continue
                seen.add(ino.ino)
                files += 1
                logical += ino.size
            elif ino.is_symlink:
                symlinks += 1
            else:
                other += 1
    file_bytes = os.stat(path).st_size
    report: dict[str, Any] = {
        "image": os.fspath(path),
        "file_bytes": file_bytes,
        "bytes_used": info.bytes_used,
        "compression": info.compression,
        "block_size": info.block_size,
        "created": info.mkfs_time,
        "created_iso": datetime.fromtimestamp(info.mkfs_time, timezone.utc).isoformat(),
        "inodes": info.inode_count,
        "files": files,
        "dirs": dirs,
        "symlinks": symlinks,
        "other": other,
        "hardlinks": hardlinks,
        "logical_bytes": logical,
        "ratio": round(info.bytes_used / logical, 4) if logical else None,
        "fragments": info.has_fragments,
        "fragment_count": info.fragment_count,
        "xattrs": info.has_xattrs,
        "exports": info.has_export_table,
        "ids": info.id_count,
        "manifest": None,
    }
    try:
        m = read_manifest(path)
    except ManifestError as e:
        report["manifest"] = {"error": str(e)}
    else:
        if m is not None:
            r = check_image(path, m)
            report["manifest"] = {
                "matches": r.ok,
                "problems": list(r.problems),
                "tool": m.tool.get("name"),
                "tool_version": m.tool.get("version"),
                "options": m.options,
                "built": m.created,
                "source": m.source,
                "checksum": m.checksum,
            }
    return report


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"image:        {r['image']}",
        f"compression:  {r['compression']}, {format_size(r['block_size'])} blocks",
        f"created:      {r['created_iso']}",
        f"contents:     {r['files']} files, {r['dirs']} dirs, {r['symlinks']} symlinks"
        + (f", {r['other']} other" if r["other"] else "")
        + (f", {r['hardlinks']} extra hard links" if r["hardlinks"] else ""),
        f"size:         {format_size(r['logical_bytes'])} of data in {format_size(r['bytes_used'])}"
        + (f" ({r['ratio']:.1%})" if r["ratio"] is not None else ""),
        f"fragments:    {_yes(r['fragments'])}" + (f" ({r['fragment_count']})" if r["fragments"] else ""),
        f"xattrs:       {_yes(r['xattrs'])}",
        f"NFS exports:  {_yes(r['exports'])}",
    ]
    m = r.get("manifest")
    if m is None:
        lines.append("manifest:     none")
    elif "error" in m:
        lines.append(f"manifest:     unusable ({m['error']})")
    else:
        state = "matches the image" if m["matches"] else "does NOT match: " + "; ".join(m["problems"])
        lines.append(f"manifest:     {state} (built with {m['tool']} {m['tool_version']})")
    return "\n".join(lines) + "\n"

