"""Errors shown to users: one line, no traceback, a documented exit code.

Exit codes (documented in the README):
  0  success
  1  the command ran but found problems (verify mismatch, doctor findings, partial refresh)
  2  usage error: bad arguments, bad configuration value
  3  not found: missing path, image, dataset or mountpoint
  4  bad image: not squashfs, corrupt or truncated
  5  busy / already running / already mounted / lock held
  6  permission refused (outside allowed roots, forbidden by site policy, not privileged)
  7  environment: missing system package or tool, FUSE unavailable
  8  no space left on device
  9  interrupted / failed external process
"""

from __future__ import annotations


class ScratchfsError(Exception):
    """Base for errors reported to the user as one line."""

    exit_code = 2


class UsageError(ScratchfsError):
    exit_code = 2


class NotFoundError(ScratchfsError):
    exit_code = 3


class BadImageError(ScratchfsError):
    exit_code = 4


class BusyError(ScratchfsError):
    exit_code = 5


class PermissionRefused(ScratchfsError):
    exit_code = 6


class EnvironmentProblem(ScratchfsError):
    exit_code = 7


class NoSpaceError(ScratchfsError):
    exit_code = 8


class ExternalFailure(ScratchfsError):
    exit_code = 9
