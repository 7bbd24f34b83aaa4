"""Our marked block in a crontab or scrontab: the lines between ``# >>> scratchfs KEY >>>`` and
``# <<< scratchfs KEY <<<``, found, replaced or removed with every other line kept as it was."""

from __future__ import annotations


def block_begin(key: str) -> str:
    return f"# >>> scratchfs {key} >>>"


def block_end(key: str) -> str:
    return f"# <<< scratchfs {key} <<<"


def split_block(text: str, key: str) -> tuple[list[str], list[str]]:
    """(lines outside our block, lines inside it). An unterminated block ends at end of text."""
    begin, end = block_begin(key), block_end(key)
    outside: list[str] = []
    inside: list[str] = []
    state = 0  # 0 before/after, 1 inside
    for line in text.splitlines():
        if state == 0 and line.strip() == begin:
            state = 1
            continue
        if state == 1:
            if line.strip() == end:
                state = 0
                continue
            inside.append(line)
            continue
        outside.append(line)
    return outside, inside


def with_block(text: str, key: str, body: list[str]) -> str:
    """*text* with our block replaced by *body* (or removed when *body* is empty); the other
    lines keep their order."""
    outside, _ = split_block(text, key)
    while outside and not outside[-1].strip():
        outside.pop()
    lines = list(outside)
    if body:
        if lines:
            lines.append("")
        lines += [block_begin(key), *body, block_end(key)]
    return "\n".join(lines) + "\n" if lines else ""


def disabled_lines(block: list[str]) -> list[str]:
    """Cron lines of our block that Slurm disabled (``scancel`` of a cron job prefixes ``#DISABLED:``)."""
    return [ln for ln in block if ln.lstrip().startswith("#DISABLED")]


def active_cron_lines(block: list[str]) -> list[str]:
    return [ln for ln in block if ln.strip() and not ln.lstrip().startswith("#")]
