"""`deparrow board`: write a board or PC image to a card or stick, give it a node identity."""

from __future__ import annotations

from pathlib import Path

import click

from deparrow.cli.context import Ctx, die, emit


@click.group("board")
def board_group() -> None:
    """Board and PC images: write one to a card or stick, give it a node identity."""


@board_group.command("flash")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("device", type=click.Path(path_type=Path))
@click.option("--yes", is_flag=True, help="Do not ask before overwriting DEVICE.")
@click.option("--no-verify", is_flag=True, help="Do not read the written image back.")
def board_flash(image: Path, device: Path, yes: bool, no_verify: bool) -> None:
    """Write IMAGE to DEVICE (an SD card, a USB stick, or a file).

    Names the device, its size and model first; refuses a partition, a mounted disk, the
    system disk, or one smaller than the image; asks before writing unless --yes.
    """
    from deparrow import board

    try:
        target = board.inspect_target(device)
        size = board.check_fits(image, target)
    except board.BoardError as e:
        die(str(e), 2)
    click.echo(f"image:  {image} ({board.human(size)})", err=True)
    click.echo(f"target: {target.describe()}", err=True)
    if not yes and not click.confirm(f"Everything on {device} will be lost. Write?", err=True):
        die("nothing written", 1)
    shown = [-1]

    def progress(done: int, total: int) -> None:
        pct = done * 100 // total
        if pct != shown[0]:
            shown[0] = pct
            click.echo(f"\rwriting: {pct:3d}% ({board.human(done)})", err=True, nl=False)

    try:
        digest = board.flash(image, target, progress, verify=not no_verify)
    except board.BoardError as e:
        click.echo("", err=True)
        die(str(e), 1)
    checked = "written, synced and read back" if not no_verify else "written and synced"
    click.echo(f"\n{device}: {checked} (sha256 {digest[:16]}…)", err=True)


@board_group.command("provision")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--hub", "hub_url", required=True, help="The hub URL the board will use.")
@click.option("--token", "token", required=True, help="Enrollment token (deparrow node token).")
@click.option(
    "--ca",
    "ca",
    default=None,
    metavar="sha256:FINGERPRINT|FILE",
    help="The CA of an https:// hub to pin: the fingerprint `deparrow node token` prints, or "
    "a PEM file; it goes on the image as deparrow/ca.pem (default: deparrow's --ca, env "
    "DEPARROW_CA).",
)
@click.option("--name", default=None, help="The node's name on the hub.")
@click.option("--wifi-ssid", default=None, help="Wi-Fi network the board joins.")
@click.option("--wifi-psk", default=None, help="Its passphrase (leave out for an open network).")
@click.option("--arch", default=None, help="The board's CPU architecture (default: the image's).")
@click.option("--cpu", type=click.FloatRange(0.1, 1024), default=None, help="CPUs it offers.")
@click.option("--memory-mb", type=click.IntRange(16), default=None, help="RAM it offers, MiB.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def board_provision(obj: Ctx | None, image: Path, hub_url: str, token: str, ca: str | None,
                    name: str | None, wifi_ssid: str | None, wifi_psk: str | None,
                    arch: str | None, cpu: float | None, memory_mb: int | None,
                    as_json: bool) -> None:  # fmt: skip
    """Enroll a board with the hub and write its identity onto IMAGE's boot partition.

    Writes deparrow/node.json (and deparrow/wifi.json) on the FAT partition with mtools; the
    image (a file, or a flashed card) boots straight into the network as that node. For an
    https:// hub, --ca pins its CA as `edge-run --ca` does, and deparrow/ca.pem goes on the
    image with the identity.
    """
    from deparrow import board

    ca = ca or (obj.ca if obj is not None else None)
    try:
        if wifi_psk is not None and wifi_ssid is None:
            raise board.BoardError("--wifi-psk needs --wifi-ssid")
        wifi = board.check_wifi(wifi_ssid, wifi_psk) if wifi_ssid is not None else None
        done = board.provision(image, hub_url, token, name, wifi, arch, cpu, memory_mb, ca)
    except board.BoardError as e:
        die(str(e), 1)
    if as_json:
        emit({"node_id": done.node_id, "owner": done.owner, "files": done.files,
              "partition": done.partition.index, "replaced": done.replaced,
              "ca": done.ca})  # fmt: skip
        return
    if done.replaced:
        click.echo(f"replaced the identity of node {done.replaced}", err=True)
    click.echo(
        f"{image}: node {done.node_id} (owner {done.owner}) written to "
        f"{done.partition.describe()}: {', '.join(done.files)}"
    )
    if done.ca is not None:
        click.echo(
            f"the board trusts only the hub's CA {done.ca} ({board.CA_FILE} on the image, "
            f"read at {board.BOARD_CA_PATH} once it boots): the hub, and its broker over TLS"
        )
    elif hub_url.lower().startswith("https://"):
        click.echo(
            "no --ca: the board verifies the hub against its system's CAs (a hub with a Let's "
            "Encrypt certificate; a MicroPython image has none: give --ca with the CA's file). "
            "A hub with its own CA needs --ca sha256:..."
        )
