"""`fedhft device add|revoke|list`: credentials, ACL entries and bundles in a `fedhft broker config`
directory, and (on a real TLS Mosquitto) a revoked device refused after SIGHUP."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.broker_server.broker.acl import acl_text
from fedhft.broker_server.broker.devices import DeviceError, add_device, list_devices, pid_from_file, revoke_device
from fedhft.broker_server.broker.production import write_production_config
from fedhft.broker_server.broker.registry import load_registry, read_credentials
from fedhft.cli.device import device_group
from fedhft.protocol import generate_keypair, key_id, load_public_key, save_public_key
from tests.support.tls_broker import make_tls_files, tls_lab, wait_until

TASK = "prov"


def _hash_matches(passwd: Path, user: str, password: str) -> bool:
    for line in passwd.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == user:
            _, seven, iterations, salt, digest = rest.split("$")
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
            return seven == "7" and got == base64.b64decode(digest)
    return False


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    out = tmp_path / "conf"
    tls = make_tls_files(tmp_path)
    write_production_config(out, TASK, "srv", ["dev-0"], port=8883, tls=tls, persistence=False)
    write_production_config(out, "other", "srv-other", ["dev-x"], port=8883, tls=tls, persistence=False)
    return out


@pytest.fixture
def server_pub(tmp_path: Path) -> Path:
    return save_public_key(tmp_path / "server_key.pub", generate_keypair()[1])


def test_acl_is_per_task_with_the_key_topic_readable_by_clients_and_written_by_the_server() -> None:
    from fedhft.broker_server.broker.acl import TaskUsers

    text = acl_text({"t1": TaskUsers("s1", ("a",)), "t2": TaskUsers("s2", ("b",))})
    blocks = [b.strip().splitlines() for b in text.split("\n\n")]
    a = next(b for b in blocks if b[0] == "user a")
    assert a[1:] == [
        "topic write fedhft/v1/t1/update/a",
        "topic write fedhft/v1/t1/hello/a",
        "topic read fedhft/v1/t1/ack/a",
        "topic read fedhft/v1/t1/model/client/a",
        "topic read fedhft/v1/t1/model/cluster/+",
        "topic read fedhft/v1/t1/key",
    ]
    s1 = next(b for b in blocks if "user s1" in b)
    assert "topic write fedhft/v1/t1/key" in s1 and not any("t2" in line for line in s1)


def test_add_writes_credentials_passwd_acl_and_a_bundle(conf: Path, server_pub: Path) -> None:
    bundle = add_device(conf, TASK, "dev-1", server_pub)
    assert bundle.dir == conf / "devices" / "dev-1" and not bundle.warnings
    files = {p.name: p for p in bundle.dir.iterdir()}
    assert set(files) == {"password", "ca.crt", "server_key.pub", "device.json"}
    assert oct(files["password"].stat().st_mode & 0o777) == "0o600"
    assert oct((conf / "devices").stat().st_mode & 0o777) == "0o700"
    password = files["password"].read_text().strip()
    assert read_credentials(conf / "credentials.txt")["dev-1"] == password == bundle.password
    assert _hash_matches(conf / "passwd", "dev-1", password)
    assert "user dev-1\ntopic write fedhft/v1/prov/update/dev-1" in (conf / "acl").read_text()
    assert key_id(load_public_key(files["server_key.pub"])) == key_id(load_public_key(server_pub))
    info = json.loads(files["device.json"].read_text())
    assert (info["task"], info["client_id"], info["broker"]) == (TASK, "dev-1", "mqtts://BROKER-HOST:8883")
    assert files["ca.crt"].read_bytes() == Path(load_registry(conf).tls.cafile).read_bytes()  # type: ignore[union-attr]
    # the other task and the earlier clients are untouched
    creds = read_credentials(conf / "credentials.txt")
    assert {"srv", "dev-0", "srv-other", "dev-x", "dev-1"} == set(creds)
    assert _hash_matches(conf / "passwd", "dev-x", creds["dev-x"])


def test_re_adding_an_id_is_an_error_naming_it_unless_the_password_is_rotated(conf: Path) -> None:
    first = add_device(conf, TASK, "dev-1")
    assert any("server_key.pub" in w for w in first.warnings)
    with pytest.raises(DeviceError, match="device 'dev-1' already exists in task 'prov'"):
        add_device(conf, TASK, "dev-1")
    with pytest.raises(DeviceError, match="'dev-x' already exists in task 'other'"):
        add_device(conf, TASK, "dev-x", rotate_password=True)
    with pytest.raises(DeviceError, match="server identity"):
        add_device(conf, TASK, "srv")
    with pytest.raises(DeviceError, match="task 'nope' is not configured"):
        add_device(conf, "nope", "dev-9")
    second = add_device(conf, TASK, "dev-1", rotate_password=True)
    assert second.password != first.password
    assert _hash_matches(conf / "passwd", "dev-1", second.password)
    assert not _hash_matches(conf / "passwd", "dev-1", first.password)


def test_revoke_removes_password_acl_and_bundle_and_records_it(conf: Path) -> None:
    add_device(conf, TASK, "dev-1")
    revoke_device(conf, TASK, "dev-1")
    assert "dev-1" not in (conf / "passwd").read_text() and "dev-1" not in (conf / "acl").read_text()
    assert "dev-1" not in read_credentials(conf / "credentials.txt")
    assert not (conf / "devices" / "dev-1").exists()
    entries = {e.client_id: e for e in list_devices(conf)}
    assert entries["dev-1"].status == "revoked" and entries["dev-1"].revoked_at is not None
    assert entries["dev-0"].status == "active" and entries["dev-x"].task == "other"
    with pytest.raises(DeviceError, match="no device 'dev-1' in task 'prov'"):
        revoke_device(conf, TASK, "dev-1")
    with pytest.raises(DeviceError, match="it is in task 'other'"):
        revoke_device(conf, TASK, "dev-x")
    add_device(conf, TASK, "dev-1")  # a revoked id may be provisioned again, with a new password
    assert {e.client_id: e.status for e in list_devices(conf)}["dev-1"] == "active"


def test_broker_config_rerun_keeps_devices_added_since(conf: Path) -> None:
    add_device(conf, TASK, "dev-1")
    tls = load_registry(conf).tls  # type: ignore[union-attr]
    write_production_config(conf, TASK, "srv", ["dev-2"], port=8883, tls=tls, persistence=False)
    assert [e.client_id for e in list_devices(conf) if e.task == TASK] == ["dev-0", "dev-1", "dev-2"]
    with pytest.raises(DeviceError, match="no fedhft-broker.json"):
        list_devices(conf.parent)


def test_cli_add_list_revoke_and_a_revoked_device_is_refused_by_the_running_broker(tmp_path: Path) -> None:
    runner = CliRunner()
    group = device_group()
    with tls_lab({TASK: ("srv", [])}) as lab:
        base = ["--conf", str(lab.conf_dir), "--task", TASK, "--client-id", "dev-1"]
        res = runner.invoke(group, ["add", *base, "--reload-pid", str(lab.pid)])
        assert res.exit_code == 0, res.output
        assert wait_until(lambda: lab.reloads() == 1, 15), lab.log()
        assert "--password-file password --tls-ca ca.crt" in res.output
        password = (lab.conf_dir / "devices" / "dev-1" / "password").read_text().strip()
        device = lab.peer("dev-1", password)
        assert device.ok, device.outcome()
        res = runner.invoke(group, ["add", *base])
        assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith("error: device 'dev-1'")
        res = runner.invoke(group, ["list", "--conf", str(lab.conf_dir), "--json"])
        assert json.loads(res.output.splitlines()[0])["status"] == "active"
        pid_file = lab.root / "mosquitto.pid"
        pid_file.write_text(f"{lab.pid}\n")
        res = runner.invoke(group, ["revoke", *base, "--pid-file", str(pid_file)])
        assert res.exit_code == 0, res.output
        assert wait_until(lambda: lab.reloads() == 2, 15), lab.log()
        assert wait_until(device.disconnected.is_set, 15), "the revoked device's connection stayed open"
        again = lab.peer("dev-1", password)
        assert again.outcome().startswith("refused"), again.outcome()
        res = runner.invoke(group, ["list", "--conf", str(lab.conf_dir)])
        assert res.output.split() == ["dev-1", TASK, "revoked", "-"]
    with pytest.raises(DeviceError, match="no PID"):
        pid_from_file(pid_file)


def test_server_init_makes_the_key_devices_need_and_keeps_it(tmp_path: Path) -> None:
    from fedhft.broker_server.key_rotation import read_chain
    from fedhft.cli import main

    state = tmp_path / "state"
    first = CliRunner().invoke(main, ["server", "init", "--state", str(state)])
    assert first.exit_code == 0 and first.output.startswith("created the server key"), first.output
    pub = load_public_key(state / "server_key.pub")
    assert read_chain(state) is not None and len(read_chain(state) or ()) == 1
    again = CliRunner().invoke(main, ["server", "init", "--state", str(state)])
    assert again.exit_code == 0 and again.output.startswith(f"kept the server key {key_id(pub)}"), again.output
    assert load_public_key(state / "server_key.pub") == pub
    bundle = add_device_after_init(tmp_path, state)
    assert load_public_key(bundle / "server_key.pub") == pub


def add_device_after_init(tmp_path: Path, state: Path) -> Path:
    out = tmp_path / "conf"
    write_production_config(out, TASK, "srv", [], tls=make_tls_files(tmp_path), persistence=False)
    return add_device(out, TASK, "dev-1", state / "server_key.pub").dir


def test_broker_config_writes_the_server_password_file_and_the_pid_file_line(tmp_path: Path) -> None:
    from fedhft.cli import main
    from fedhft.credentials import read_password_file

    out, pid = tmp_path / "conf", tmp_path / "run" / "mosquitto.pid"
    args = ["broker", "config", "--out", str(out), "--task", TASK, "--server-user", "srv", "--client", "dev-0"]
    res = CliRunner().invoke(main, [*args, "--no-tls", "--no-persistence", "--pid-file", str(pid)])
    assert res.exit_code == 0, res.output
    server_file = out / "srv.password"
    assert read_password_file(server_file) == read_credentials(out / "credentials.txt")["srv"]
    assert server_file.stat().st_mode & 0o777 == 0o600
    assert f"--password-file {server_file}" in res.output
    assert f"pid_file {pid}\n" in (out / "mosquitto.conf").read_text()
    res = CliRunner().invoke(main, [*args, "--no-tls", "--no-persistence"])
    assert "pid_file" not in (out / "mosquitto.conf").read_text()


def test_device_add_prints_the_exact_edge_run_line(conf: Path, server_pub: Path) -> None:
    res = CliRunner().invoke(
        device_group(), ["add", "--conf", str(conf), "--task", TASK, "--client-id", "dev-9", "--server-key",
                         str(server_pub), "--broker-url", "mqtts://broker.example.org:8883"]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    line = (
        f"fedhft edge run --broker mqtts://broker.example.org:8883 --task {TASK} --client-id dev-9 --username dev-9 "
        "--password-file password --tls-ca ca.crt --server-key server_key.pub --artifacts model --data data.csv "
        "--state-dir state"
    )
    assert line in res.stdout.splitlines()
    assert "..." not in res.stdout


# ---- bundles with the model package: device.env, the systemd unit, the native trainer -----------------------
def _add(conf: Path, server_pub: Path, client_id: str, *extra: str):  # noqa: ANN202
    return CliRunner().invoke(
        device_group(), ["add", "--conf", str(conf), "--task", TASK, "--client-id", client_id, "--server-key",
                         str(server_pub), "--broker-url", "mqtts://broker.example.org:8883", *extra]
    )  # fmt: skip


def _env(path: Path) -> dict[str, str]:
    pairs = (ln.split("=", 1) for ln in path.read_text().splitlines() if ln and not ln.startswith("#"))
    return dict(pairs)


def _unit(path: Path) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in path.read_text().splitlines() if "=" in ln)


def _executorch_package(tiny_export: Path, dest: Path, arch: str) -> Path:
    """The tiny package rewritten as an ExecuTorch-only one for a device of ``arch`` (bundling reads only
    the manifest's formats and profile)."""
    import shutil

    from fedhft.device_profiles.profile import load_profile

    shutil.copytree(tiny_export, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["artifacts"] = {"executorch": {"program": {"path": "executorch/train.pte", "sha256": "0" * 64, "bytes": 1}}}
    m["profile"] = {**load_profile("rpi4-4gb").to_dict(), "arch": arch}
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_bundle_for_an_ort_profile_holds_model_env_and_unit(conf: Path, server_pub: Path, tiny_export: Path) -> None:
    res = _add(conf, server_pub, "dev-ort", "--artifacts", str(tiny_export))
    assert res.exit_code == 0, res.output
    b = conf / "devices" / "dev-ort"
    assert (b / "model" / "manifest.json").read_bytes() == (tiny_export / "manifest.json").read_bytes()
    assert not (b / "fedhft-et-trainer").exists()
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("fedhft edge run "))
    unit = _unit(b / "fedhft-edge.service")
    assert unit["ExecStart"] == line
    assert unit["Restart"] == "on-failure"
    assert unit["WorkingDirectory"] == "/opt/fedhft/dev-ort"
    assert unit["EnvironmentFile"] == "/opt/fedhft/dev-ort/device.env"
    env = _env(b / "device.env")
    assert env["FEDHFT_BROKER"] == "mqtts://broker.example.org:8883" and env["FEDHFT_TASK"] == TASK
    assert env["FEDHFT_CLIENT_ID"] == "dev-ort" and env["FEDHFT_BACKEND"] == "auto"
    assert (env["FEDHFT_PASSWORD_FILE"], env["FEDHFT_TLS_CA"], env["FEDHFT_SERVER_KEY"]) == (
        "password",
        "ca.crt",
        "server_key.pub",
    )
    assert all((b / env[k]).is_file() for k in ("FEDHFT_PASSWORD_FILE", "FEDHFT_TLS_CA", "FEDHFT_SERVER_KEY"))
    assert "FEDHFT_NATIVE_TRAINER" not in env
    assert "systemctl enable --now fedhft-edge.service" in res.stdout
    info = json.loads((b / "device.json").read_text())
    assert {"model", "device.env", "fedhft-edge.service"} <= set(info["files"])


def test_bundle_for_a_native_profile_holds_this_machines_trainer(
    conf: Path, server_pub: Path, tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import platform

    from fedhft.edge_runtime.native_backend import ENV_BINARY, binary_arch

    fake = tmp_path / "trainer"
    fake.write_bytes(
        b"\x7fELF\x02\x01\x01" + bytes(11) + (62 if platform.machine() == "x86_64" else 183).to_bytes(2, "little")
    )
    fake.chmod(0o755)
    monkeypatch.setenv(ENV_BINARY, str(fake))
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "libexecutorch.so").write_bytes(b"lib")
    pkg = _executorch_package(tiny_export, tmp_path / "pkg", platform.machine())
    res = _add(
        conf, server_pub, "pi-1", "--artifacts", str(pkg), "--trainer-libs", str(libs), "--device-dir", "/srv/pi"
    )
    assert res.exit_code == 0, res.output
    b = conf / "devices" / "pi-1"
    assert (b / "fedhft-et-trainer").read_bytes() == fake.read_bytes()
    assert binary_arch(b / "fedhft-et-trainer") == platform.machine()
    assert (b / "lib" / "libexecutorch.so").is_file()
    env = _env(b / "device.env")
    assert env["FEDHFT_NATIVE_TRAINER"] == "fedhft-et-trainer" and env["LD_LIBRARY_PATH"] == "lib"
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("fedhft edge run "))
    assert _unit(b / "fedhft-edge.service")["ExecStart"] == line
    assert _unit(b / "fedhft-edge.service")["WorkingDirectory"] == "/srv/pi"


def test_rpi4_bundle_takes_an_aarch64_trainer_and_says_when_there_is_none(
    conf: Path, server_pub: Path, tiny_export: Path, tmp_path: Path
) -> None:
    pkg = _executorch_package(tiny_export, tmp_path / "pkg", "aarch64")
    res = _add(conf, server_pub, "pi-2", "--artifacts", str(pkg))
    assert res.exit_code == 0, res.output
    assert "warning: no native trainer for aarch64 in the bundle: build one (bench/aarch64_native.sh)" in res.stderr
    assert not (conf / "devices" / "pi-2" / "fedhft-et-trainer").exists()
    x86 = tmp_path / "x86"
    x86.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + (62).to_bytes(2, "little"))
    res = _add(conf, server_pub, "pi-3", "--artifacts", str(pkg), "--trainer", str(x86))
    assert res.exit_code == 1 and f"--trainer {x86} is built for x86_64, the device is aarch64" in res.output
    arm = tmp_path / "arm"
    arm.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + (183).to_bytes(2, "little"))
    res = _add(conf, server_pub, "pi-3", "--artifacts", str(pkg), "--trainer", str(arm))
    assert res.exit_code == 0, res.output
    assert (conf / "devices" / "pi-3" / "fedhft-et-trainer").read_bytes() == arm.read_bytes()
