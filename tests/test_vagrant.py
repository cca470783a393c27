"""The Vagrant lab: the Vagrantfile validates, the provisioning scripts do what they say."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from kernel import require

CHECKOUT = Path(__file__).resolve().parent.parent
ENABLE = CHECKOUT / "vagrant" / "enable-bpf-lsm.sh"
PROVISION = CHECKOUT / "vagrant" / "provision.sh"

DEBIAN_GRUB = """# If you change this file, run 'update-grub' afterwards to update
GRUB_DEFAULT=0
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX=""
"""


def test_vagrantfile_ruby_syntax() -> None:
    require(shutil.which("ruby"), "ruby is not installed")
    proc = subprocess.run(["ruby", "-c", str(CHECKOUT / "Vagrantfile")], capture_output=True, text=True)
    assert proc.returncode == 0 and "Syntax OK" in proc.stdout, proc.stderr


def test_vagrant_validate(tmp_path: Path) -> None:
    require(shutil.which("vagrant"), "vagrant is not installed")
    # Vagrant's state goes to tmp_path, not into the checkout or root's home.
    env = dict(
        os.environ,
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
        VAGRANT_HOME=str(tmp_path / "home"),
        VAGRANT_CHECKPOINT_DISABLE="1",
    )
    proc = subprocess.run(
        ["vagrant", "validate"], cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout
    assert not (CHECKOUT / ".vagrant").exists()


def test_vagrantfile_declares_both_machines_and_providers() -> None:
    text = (CHECKOUT / "Vagrantfile").read_text()
    for needle in (
        '"debian/bookworm64"',
        '"bento/ubuntu-24.04"',
        "provider :libvirt",
        "provider :virtualbox",
        '"vagrant/enable-bpf-lsm.sh", reboot: true',
        '"vagrant/provision.sh"',
    ):
        assert needle in text


def run_enable(grub: Path, shell: str = "/bin/sh") -> subprocess.CompletedProcess:
    return subprocess.run(
        [*shell.split(), str(ENABLE), "--grub-file", str(grub)], capture_output=True, text=True, timeout=30
    )


def cmdline(grub: Path) -> str:
    lines = [ln for ln in grub.read_text().splitlines() if ln.startswith("GRUB_CMDLINE_LINUX=")]
    assert len(lines) == 1, grub.read_text()
    return lines[0].removeprefix("GRUB_CMDLINE_LINUX=").strip('"')


SHELLS = ["/bin/sh", "/bin/busybox sh"]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("before", "expected"),
    [
        ('GRUB_CMDLINE_LINUX=""', "lsm=*,bpf"),
        ("GRUB_CMDLINE_LINUX='console=ttyS0 net.ifnames=0'", "console=ttyS0 net.ifnames=0 lsm=*,bpf"),
        (
            'GRUB_CMDLINE_LINUX="quiet lsm=landlock,yama,apparmor splash"',
            "quiet lsm=landlock,yama,apparmor,bpf splash",
        ),
        ('GRUB_CMDLINE_LINUX="lsm=bpf,yama"', "lsm=yama,bpf"),
        (None, "lsm=*,bpf"),
    ],
)
def test_enable_bpf_lsm_edits_grub_idempotently(
    tmp_path: Path, shell: str, before: str | None, expected: str
) -> None:
    if shell.startswith("/bin/busybox"):
        require(Path("/bin/busybox").exists(), "busybox-static is not installed")
    grub = tmp_path / "grub"
    grub.write_text(DEBIAN_GRUB.replace('GRUB_CMDLINE_LINUX=""\n', f"{before}\n" if before else ""))
    grub.chmod(0o600)
    proc = run_enable(grub, shell)
    assert proc.returncode == 0 and proc.stdout.strip() == "changed", proc.stderr
    value = cmdline(grub)
    if "*" in expected:
        head, tail = expected.split("*")
        assert value.startswith(head) and value.endswith(tail), value
        lsm = next(p for p in value.split() if p.startswith("lsm="))[4:].split(",")
        assert lsm[-1] == "bpf" and lsm.count("bpf") == 1 and len(lsm) > 1
    else:
        assert value == expected
    # The rest of the file and its mode are untouched.
    assert 'GRUB_CMDLINE_LINUX_DEFAULT="quiet"' in grub.read_text()
    assert stat.S_IMODE(grub.stat().st_mode) == 0o600
    snapshot = grub.read_bytes()
    again = run_enable(grub, shell)
    assert again.returncode == 0 and again.stdout.strip() == "unchanged"
    assert grub.read_bytes() == snapshot
    assert list(tmp_path.iterdir()) == [grub]  # no temporary file left


def test_enable_bpf_lsm_missing_grub_file(tmp_path: Path) -> None:
    proc = run_enable(tmp_path / "absent")
    assert proc.returncode == 1
    assert "not found" in proc.stderr


@pytest.mark.lab
def test_provisioning_in_a_bpf_lsm_kernel(tmp_path: Path) -> None:
    """In a kernel with BPF-LSM active, the GRUB edit keeps the active list, and provision.sh's
    kernel checks pass."""
    lsms = Path("/sys/kernel/security/lsm").read_text().strip()
    grub = tmp_path / "grub"
    grub.write_text(DEBIAN_GRUB)
    assert run_enable(grub).stdout.strip() == "changed"
    # The active list with bpf last: on 6.1 that is the list as it is; 6.12 lists ima,evm after
    # bpf (LSMs the kernel always appends last, wherever lsm= names them).
    assert cmdline(grub) == "lsm=" + ",".join([x for x in lsms.split(",") if x != "bpf"] + ["bpf"])
    proc = subprocess.run(
        ["/bin/sh", str(PROVISION), str(CHECKOUT)],
        capture_output=True,
        text=True,
        env=dict(os.environ, STOCKADE_PROVISION_CHECK_ONLY="1"),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kernel ready" in proc.stdout
