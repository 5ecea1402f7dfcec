#!/usr/bin/env python3
"""Fakes of the bhyve host tools: zfs, bhyve, bhyveload, bhyvectl, ifconfig, dladm, kldstat,
pfexec, sudo, doas, dd, and the guest's p9kp and hostname. One program; the name it is called
by picks the tool (bin/ holds symlinks).

Sharp edges of the real tools (reference real-hosts.md) are kept: bhyve with neither a bootrom
nor a prior bhyveload exits 4 ("virtual machine cannot be booted"); sudo forks, stays the
parent of what it runs (relaying TERM/INT/HUP) and sets HOME to root's; nmdm nodes are root's
(0600); bhyve exits when bhyvectl --destroy takes its VM away.

Outputs, messages and exit codes follow reference/bhyve-falcon.md. State lives in
$FAKE_BHYVE_STATE (state.json, commands.log, and dev/ standing in for /dev). The flavor is
$FAKE_BHYVE_FLAVOR (freebsd|illumos). Failure injection:
  FAKE_ZFS_BUSY=N        the next N `zfs destroy` calls fail with `dataset is busy`
  FAKE_DLADM_BUSY=N      the next N `dladm delete-vnic` calls fail with `link busy`
  FAKE_BHYVE_CRASH=MSG   bhyve prints MSG on stderr and exits 4 (VMM allocation failure etc.)
  FAKE_ZVOL_DELAY_MS=N   a new zvol's device node appears N ms after zfs returns
  FAKE_GUEST_PASSWORD=P  the guest asks for a password and checks it
  FAKE_GUEST_NO_GETTY=1  the guest never prints a login prompt
  FAKE_GUEST_RESPAWN=1   when the login shell exits, getty prompts again (else the guest powers off)
  FAKE_GUEST_NO_ACPI=1   the guest ignores the power button (bhyve's SIGTERM) and keeps running
  FAKE_KLD_MODULES=a,b   the FreeBSD kernel modules loaded (default vmm,nmdm), for kldstat
The bhyve processes write {"vm", "orphaned"} lines to bhyve-exits.jsonl when they exit
(orphaned: the privilege prefix that started it died first). The guest's `hostname NAME`
writes guest-<vm>/hostname.
"""
import fcntl, json, os, pty, select, signal, socket, subprocess, sys, termios, time, tty

STATE = os.environ.get("FAKE_BHYVE_STATE", "")
FLAVOR = os.environ.get("FAKE_BHYVE_FLAVOR", "freebsd")
DEV = os.path.join(STATE, "dev")
HERE = os.path.dirname(os.path.realpath(__file__))


def dev(path):
    """A /dev path inside the fake device root."""
    return os.path.join(DEV, path[len("/dev/"):]) if path.startswith("/dev/") else path


def log_command(argv):
    with open(os.path.join(STATE, "commands.log"), "a") as f:
        f.write(json.dumps(argv) + "\n")


class State:
    def __enter__(self):
        os.makedirs(STATE, exist_ok=True)
        self.lock = open(os.path.join(STATE, "state.lock"), "a")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        p = os.path.join(STATE, "state.json")
        self.data = json.load(open(p)) if os.path.exists(p) else {}
        self.data.setdefault("datasets", {})
        self.data.setdefault("counters", {})
        self.data.setdefault("taps", {})
        self.data.setdefault("vnics", [])
        self.data.setdefault("opens", {})
        return self

    def __exit__(self, *exc):
        p = os.path.join(STATE, "state.json")
        with open(p + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1)
        os.rename(p + ".tmp", p)
        fcntl.flock(self.lock, fcntl.LOCK_UN)

    def inject(self, var):
        """Consume one injected failure of this kind, if any are left."""
        n = int(os.environ.get(var, "0") or 0)
        used = self.data["counters"].get(var, 0)
        if used < n:
            self.data["counters"][var] = used + 1
            return True
        return False


def fail(msg, code=1, out=sys.stderr):
    out.write(msg + "\n")
    sys.exit(code)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------- zfs
def zvol_devs(name):
    if FLAVOR == "illumos":
        return [dev("/dev/zvol/rdsk/" + name), dev("/dev/zvol/dsk/" + name)]
    return [dev("/dev/zvol/" + name)]


def make_zvol_dev(name, size):
    delay = int(os.environ.get("FAKE_ZVOL_DELAY_MS", "0") or 0)
    script = "import os,sys,time\ntime.sleep(%f)\nfor p in sys.argv[1:]:\n os.makedirs(os.path.dirname(p),exist_ok=True)\n open(p,'ab').truncate(%d)\n" % (delay / 1000.0, size)
    if delay:
        subprocess.Popen([sys.executable, "-c", script] + zvol_devs(name), start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        for p in zvol_devs(name):
            os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "ab").truncate(size)


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def zfs(args):
    if not args:
        fail("usage: zfs command args ...", 2)
    cmd, args = args[0], args[1:]
    with State() as st:
        ds = st.data["datasets"]

        def need(name):
            if name not in ds:
                fail("cannot open '%s': dataset does not exist" % name)

        def opts(args):
            flags, props, rest, i = set(), {}, [], 0
            while i < len(args):
                a = args[i]
                if a in ("-o", "-V", "-t", "-s") and i + 1 < len(args):
                    if a == "-o" and "=" in args[i + 1]:
                        k, v = args[i + 1].split("=", 1)
                        props[k] = v
                    else:
                        props[a] = args[i + 1]
                    i += 2
                    continue
                if a.startswith("-") and len(a) > 1:
                    flags.update(a[1:])
                else:
                    rest.append(a)
                i += 1
            return flags, props, rest

        flags, props, rest = opts(args)
        if cmd == "list":
            cols = props.get("-o", "name").split(",")
            types = props.get("-t", "filesystem,volume").split(",")
            if "all" in types:
                types = ["filesystem", "volume", "snapshot"]
            names = rest or sorted(ds)
            out = []
            for n in names:
                need(n)
                sel = [n]
                if "r" in flags:
                    sel = sorted(d for d in ds if d == n or d.startswith(n + "/") or d.startswith(n + "@"))
                for d in sel:
                    if d != n or "r" in flags:
                        if ds[d]["type"] not in types:
                            continue
                    row = []
                    for c in cols:
                        if c == "name":
                            row.append(d)
                        elif c == "type":
                            row.append(ds[d]["type"])
                        else:
                            row.append(str(ds[d]["props"].get(c, "-")))
                    out.append(row)
            if "H" not in flags:
                print("\t".join(c.upper() for c in cols))
            for row in out:
                print("\t".join(row))
            return 0
        if cmd == "create":
            name = rest[-1]
            if name in ds:
                fail("cannot create '%s': dataset already exists" % name)
            parent = name.rsplit("/", 1)[0]
            if parent not in ds and "p" not in flags and "/" in name:
                fail("cannot create '%s': parent does not exist" % name)
            if "p" in flags:
                parts = name.split("/")
                for i in range(1, len(parts)):
                    ds.setdefault("/".join(parts[:i]), {"type": "filesystem", "props": {}})
            p = {k: v for k, v in props.items() if not k.startswith("-")}
            if "-V" in props:
                size = parse_size(props["-V"])
                p["volsize"] = size
                ds[name] = {"type": "volume", "props": p}
                make_zvol_dev(name, size)
            else:
                ds[name] = {"type": "filesystem", "props": p}
            return 0
        if cmd == "snapshot":
            snap = rest[0]
            base = snap.split("@")[0]
            need(base)
            if snap in ds:
                fail("cannot create snapshot '%s': dataset already exists" % snap)
            ds[snap] = {"type": "snapshot", "props": dict(ds[base]["props"])}
            return 0
        if cmd == "clone":
            snap, target = rest[0], rest[1]
            need(snap)
            if target in ds:
                fail("cannot create '%s': dataset already exists" % target)
            parts = target.split("/")
            if "p" in flags:
                for i in range(1, len(parts)):
                    ds.setdefault("/".join(parts[:i]), {"type": "filesystem", "props": {}})
            elif "/".join(parts[:-1]) not in ds:
                fail("cannot create '%s': parent does not exist" % target)
            p = dict(ds[snap]["props"])
            p.update({k: v for k, v in props.items() if not k.startswith("-")})
            p["origin"] = snap
            ds[target] = {"type": "volume", "props": p}
            make_zvol_dev(target, int(p.get("volsize", 1 << 20)))
            return 0
        if cmd == "set":
            k, v = rest[0].split("=", 1)
            need(rest[1])
            ds[rest[1]]["props"][k] = v
            if k == "volsize":
                for p in zvol_devs(rest[1]):
                    if os.path.exists(p):
                        open(p, "ab").truncate(parse_size(v))
            return 0
        if cmd == "get":
            prop, name = rest[0], rest[1]
            need(name)
            print(ds[name]["props"].get(prop, "-"))
            return 0
        if cmd == "destroy":
            name = rest[0]
            need(name)
            if st.inject("FAKE_ZFS_BUSY"):
                fail("cannot destroy '%s': dataset is busy" % name)
            children = [d for d in ds if d.startswith(name + "/") or d.startswith(name + "@")]
            for d in [name] + children:
                for p in zvol_devs(d):
                    pid = st.data["opens"].get(p)
                    if pid and pid_alive(pid):
                        fail("cannot destroy '%s': dataset is busy" % d)
            if ds[name]["type"] == "snapshot":
                clones = [d for d in ds if ds[d]["props"].get("origin") == name]
                if clones and "R" not in flags:
                    sys.stderr.write("cannot destroy '%s': snapshot has dependent clones\n" % name)
                    fail("use '-R' to destroy the following datasets:\n" + "\n".join(clones))
                victims = [name] + clones
            else:
                if children and not ({"r", "R"} & flags):
                    sys.stderr.write("cannot destroy '%s': filesystem has children\n" % name)
                    fail("use '-r' to destroy the following datasets:\n" + "\n".join(sorted(children)))
                victims = [name] + children
                snaps = [d for d in victims if ds[d]["type"] == "snapshot"]
                clones = [d for d in ds if ds[d]["props"].get("origin") in snaps and d not in victims]
                if clones and "R" not in flags:
                    sys.stderr.write("cannot destroy '%s': snapshot has dependent clones\n" % snaps[0])
                    fail("use '-R' to destroy the following datasets:\n" + "\n".join(clones))
                victims += clones
            for d in victims:
                ds.pop(d, None)
                for p in zvol_devs(d):
                    if os.path.exists(p):
                        os.remove(p)
            return 0
        fail("unrecognized command '%s'" % cmd, 2)


# ---------------------------------------------------------------- bhyvectl
def bhyvectl(args):
    vm = next((a.split("=", 1)[1] for a in args if a.startswith("--vm=")), None)
    if vm is None:
        fail("Usage: bhyvectl --vm=<vmname> [--destroy] ...", 1)
    if "--destroy" in args:
        node = os.path.join(DEV, "vmm", vm)
        if not os.path.exists(node):
            if FLAVOR == "illumos":
                fail("VM:%s is not created." % vm, 1, sys.stdout)
            fail("vm_open: %s could not be opened: No such file or directory" % vm, 1)
        os.remove(node)
        return 0
    return 0


# ---------------------------------------------------------------- ifconfig (FreeBSD)
def ifconfig(args):
    with State() as st:
        taps = st.data["taps"]
        bridges = os.environ.get("FAKE_BRIDGES", "bridge0").split(",")
        if args == ["tap", "create"]:
            n = 0
            while "tap%d" % n in taps:
                n += 1
            taps["tap%d" % n] = {"description": "", "bridge": None}
            print("tap%d" % n)
            return 0
        if args[:2] == ["-g", "tap"]:
            for t in sorted(taps):
                print(t)
            return 0
        name = args[0] if args else ""
        if name in bridges and len(args) == 3 and args[1] == "addm":
            if args[2] not in taps:
                fail("ifconfig: BRDGADD %s: No such file or directory" % args[2])
            taps[args[2]]["bridge"] = name
            return 0
        if name not in taps and name not in bridges:
            fail("ifconfig: interface %s does not exist" % name)
        if len(args) == 1:
            if taps.get(name, {}).get("up"):
                print("%s: flags=8943<UP,BROADCAST,RUNNING,PROMISC,SIMPLEX,MULTICAST> metric 0 mtu 1500" % name)
            else:
                print("%s: flags=8802<BROADCAST,SIMPLEX,MULTICAST> metric 0 mtu 1500" % name)
            if taps.get(name, {}).get("description"):
                print("\tdescription: %s" % taps[name]["description"])
            print("\tgroups: tap")
            return 0
        if args[1] == "destroy":
            taps.pop(name)
            return 0
        if args[1] in ("up", "down") and name in taps:
            taps[name]["up"] = args[1] == "up"
            return 0
        if args[1] == "description":
            taps[name]["description"] = args[2]
            return 0
        fail("ifconfig: %s: bad value" % args[1])


# ---------------------------------------------------------------- dladm (illumos)
def dladm(args):
    with State() as st:
        vnics = st.data["vnics"]
        links = os.environ.get("FAKE_LINKS", "igb0,stub0").split(",")
        if args and args[0] == "create-vnic":
            name, link = args[-1], args[args.index("-l") + 1]
            if link not in links:
                fail("dladm: vnic creation failed: object not found")
            if name in vnics:
                fail("dladm: vnic creation failed: object already exists")
            vnics.append(name)
            return 0
        if args and args[0] == "delete-vnic":
            name = args[-1]
            if name not in vnics:
                fail("dladm: vnic deletion failed: object not found")
            if st.inject("FAKE_DLADM_BUSY"):
                fail("dladm: vnic deletion failed: link busy")
            vnics.remove(name)
            return 0
        if args and args[0] == "show-vnic":
            for v in vnics:
                print(v)
            return 0
        fail("dladm: unknown subcommand '%s'" % (args[0] if args else ""))


# ---------------------------------------------------------------- kldstat (FreeBSD)
def kldstat(args):
    loaded = [m for m in os.environ.get("FAKE_KLD_MODULES", "vmm,nmdm").split(",") if m]
    if "-m" in args:
        name = args[args.index("-m") + 1]
        if name in loaded:
            if "-q" not in args:
                print("Id Refs Address                Size Name\n     1    1 0xffffffff82a00000  ... %s" % name)
            return 0
        if "-q" not in args:
            fail("kldstat: can't find module %s: No such file or directory" % name)
        return 1
    return 0


# ---------------------------------------------------------------- bhyveload (FreeBSD)
def bhyveload(args):
    disk, mem, vm, i = None, None, None, 0
    while i < len(args):
        a = args[i]
        if a in ("-c", "-e", "-h", "-l", "-o", "-S"):
            i += 2
            continue
        if a == "-m":
            mem = args[i + 1]; i += 2; continue
        if a == "-d":
            disk = args[i + 1]; i += 2; continue
        vm = a; i += 1
    if vm is None or disk is None:
        fail("usage: bhyveload [-S][-c <console-device>] [-d <disk-path>] [-e <name=value>]\n"
             "                 [-h <host-path>] [-m memsize[K|k|M|m|G|g|T|t]] <vmname>", 1)
    if not os.path.exists(dev(disk)):
        fail("bhyveload: open(%s): No such file or directory" % disk, 1)
    os.makedirs(os.path.join(DEV, "vmm"), exist_ok=True)
    open(os.path.join(DEV, "vmm", vm), "a").close()
    with State() as st:
        st.data.setdefault("loaded", {})[vm] = True
    print("Consoles: userboot  \n\nFreeBSD/amd64 User boot lua, Revision 1.2\nLoading kernel...")
    return 0


# ---------------------------------------------------------------- pfexec / sudo / dd
def pfexec(args):
    """pfexec (and doas) exec the command: its pid is the command's."""
    os.execvp(args[0], args)


def sudo(args):
    """sudo forks and stays the parent of the command, relaying signals it receives; the pid
    a caller sees is sudo's. HOME becomes root's."""
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt == "--":
            break
        if opt in ("-u", "-g", "-C", "-D"):
            args.pop(0)
    env = dict(os.environ, HOME="/root", USER="root", LOGNAME="root")
    child = subprocess.Popen(args, env=env)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda n, _f: child.send_signal(n))
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:
            continue
    return 128 - code if code < 0 else code


def dd(args):
    args = ["of=" + dev(a[3:]) if a.startswith("of=") else a for a in args]
    os.execv("/bin/dd", ["dd"] + args)


def p9kp(args):
    """The illumos guest's one-shot copy of the 9p share into the cwd."""
    share = os.environ.get("FAKE_9P_SHARE")
    if args != ["pull"] or not share:
        fail("p9kp: no virtio-9p device found", 1)
    subprocess.check_call(["cp", "-R", share + "/.", "."])
    return 0


# ---------------------------------------------------------------- bhyve
def bhyve(args):
    slots, lpc, vm, i = [], [], None, 0
    while i < len(args):
        a = args[i]
        if a in ("-c", "-m"):
            i += 2
            continue
        if a == "-s":
            slots.append(args[i + 1]); i += 2; continue
        if a == "-l":
            lpc.append(args[i + 1]); i += 2; continue
        if a.startswith("-"):
            i += 1; continue
        vm = a; i += 1
    if vm is None:
        fail("Usage: bhyve [-AaCDeHhPSuWwxY] ... <vm>", 4)
    crash = os.environ.get("FAKE_BHYVE_CRASH")
    if crash:
        time.sleep(0.2)
        fail(crash, 4)
    with State() as st:
        loaded = st.data.setdefault("loaded", {}).pop(vm, False)
    if not loaded and not any(l.startswith("bootrom,") for l in lpc):
        # do_open(): a VM bhyve creates itself needs a bootrom; only bhyveload's can go without.
        fail("virtual machine cannot be booted", 4)
    disks, share = [], None
    for s in slots:
        parts = s.split(",")
        if parts[1] == "virtio-blk":
            disks.append(parts[2])
        if parts[1] == "virtio-9p":
            share = parts[2].split("=", 1)[1]
        if parts[1] == "virtio-net-viona" and FLAVOR != "illumos":
            fail("Invalid PCI emulation 'virtio-net-viona'", 4)
    for d in disks:
        want = "/dev/zvol/rdsk/" if FLAVOR == "illumos" else "/dev/zvol/"
        if not d.startswith(want) or (FLAVOR == "freebsd" and d.startswith("/dev/zvol/rdsk/")):
            fail("Could not open backing file: %s: No such file or directory" % d, 4)
        if not os.path.exists(dev(d)):
            fail("Could not open backing file: %s: No such file or directory" % d, 4)
    console = None
    for l in lpc:
        kind, _, rest = l.partition(",")
        if kind == "bootrom" and not os.path.exists(rest.split(",")[0]):
            fail("bootrom: open(%s): No such file or directory" % rest.split(",")[0], 4)
        if kind == "com1":
            if rest.startswith("socket,"):
                if FLAVOR != "illumos":
                    fail("Unable to initialize backend 'socket' for LPC device com1", 4)
                if "," in rest[len("socket,"):]:
                    fail("Unable to initialize backend '%s' for LPC device com1" % rest, 4)
                console = ("socket", rest[len("socket,"):])
            elif rest.startswith("/dev/nmdm"):
                if FLAVOR != "freebsd":
                    fail("Unable to initialize backend '%s' for LPC device com1" % rest, 4)
                console = ("nmdm", rest)
            elif rest == "stdio":
                console = ("stdio", None)
    os.makedirs(os.path.join(DEV, "vmm"), exist_ok=True)
    open(os.path.join(DEV, "vmm", vm), "a").close()
    with State() as st:
        for d in disks:
            st.data["opens"][dev(d)] = os.getpid()
    Guest(vm, console, share).run()


class Guest:
    """The VM: a boot banner, a getty, then a real /bin/sh on its own pty, behind the console."""

    def __init__(self, vm, console, share):
        self.vm, self.kind, self.share = vm, console[0] if console else None, share
        self.client = None      # where console output goes (nmdm master, socket client)
        self.listener = None
        self.sh = None
        self.gfd = None
        self.phase = "boot"
        self.line = b""
        self.user = b""
        if self.kind == "nmdm":
            a = console[1]
            m, s = pty.openpty()
            tty.setraw(s)
            self.client, self.keep_slave = m, s
            b = dev(a[:-1] + "B")
            os.makedirs(os.path.dirname(b), exist_ok=True)
            if os.path.lexists(b):
                os.remove(b)
            os.chmod(os.ttyname(s), 0o600)  # nmdm nodes: root:wheel 0600
            os.symlink(os.ttyname(s), b)
            self.b = b
        elif self.kind == "socket":
            path = console[1]
            if os.path.exists(path):
                os.unlink(path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.listener.listen(1)
            self.path = path

    def out(self, data):
        if self.client is None:
            return  # illumos: output is dropped while no client is connected
        try:
            if isinstance(self.client, socket.socket):
                self.client.sendall(data)
            else:
                os.write(self.client, data)
        except OSError:
            pass

    def start_shell(self):
        m, s = pty.openpty()
        env = dict(os.environ)
        env.update({"PS1": "root@%s:~ # " % self.vm, "HOME": "/root",
                    "PATH": os.path.join(HERE, "guest-bin") + ":/usr/bin:/bin"})
        if self.share:
            env["FAKE_9P_SHARE"] = self.share
        env["FAKE_GUEST_STATE"] = os.path.join(STATE, "guest-" + self.vm)
        for k in [k for k in env if k.startswith("FAKE_") and k not in ("FAKE_9P_SHARE", "FAKE_GUEST_STATE")]:
            del env[k]
        def ctty():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # A guest's shell starts with the default dispositions, whatever this fake
            # inherited (a background job of a non-interactive shell ignores SIGINT and
            # SIGQUIT, and Ctrl-C on the console would then interrupt nothing).
            for sig in (signal.SIGINT, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_DFL)
        self.sh = subprocess.Popen(["/bin/sh", "-i"], stdin=s, stdout=s, stderr=s, cwd="/", env=env,
                                   start_new_session=True, preexec_fn=ctty)
        os.close(s)
        self.gfd = m
        self.phase = "shell"

    def prompt(self):
        if FLAVOR == "illumos":
            self.out(b"\r\n%s console login: " % self.vm.encode())
        else:
            self.out(b"\r\nFreeBSD/amd64 (%s) (ttyu0)\r\n\r\nlogin: " % self.vm.encode())
        self.phase = "login"

    def typed(self, data):
        if self.phase == "shell":
            os.write(self.gfd, data)
            return
        for c in data:
            ch = bytes([c])
            if self.phase not in ("login", "password"):
                continue
            if ch in (b"\r", b"\n"):
                self.out(b"\r\n")
                if self.phase == "login":
                    self.user = self.line
                    self.line = b""
                    if not self.user:
                        self.prompt()
                    elif os.environ.get("FAKE_GUEST_PASSWORD") is not None:
                        self.out(b"Password:")
                        self.phase = "password"
                    else:
                        self.start_shell()
                        return
                else:
                    ok = self.line.decode(errors="replace") == os.environ["FAKE_GUEST_PASSWORD"]
                    self.line = b""
                    if ok:
                        self.start_shell()
                        return
                    self.out(b"Login incorrect\r\n")
                    self.prompt()
            else:
                self.line += ch
                if self.phase == "login":
                    self.out(ch)

    def run(self):
        stop = {"now": False}
        def term(*_):
            if not os.environ.get("FAKE_GUEST_NO_ACPI"):
                stop["now"] = True  # the guest honours the power button and powers off
        signal.signal(signal.SIGTERM, term)
        parent = os.getppid()
        node = os.path.join(DEV, "vmm", self.vm)
        booted_at = time.time() + 0.2
        code = 1  # powered off
        while not stop["now"]:
            if not os.path.exists(node):
                # bhyvectl --destroy took the VM away: vm_run fails and bhyve exits.
                sys.stderr.write("vm_run error -1, errno 6\n"); sys.stderr.flush()
                code = 4
                break
            if self.phase == "boot" and time.time() >= booted_at:
                self.out(b"Consoles: userboot  \r\n\r\nvmtest fake %s guest booting\r\n" % FLAVOR.encode())
                if not os.environ.get("FAKE_GUEST_NO_GETTY"):
                    self.prompt()
                else:
                    self.phase = "nogetty"
            fds = [f for f in (self.listener, self.client, self.gfd) if f is not None]
            try:
                ready, _, _ = select.select(fds, [], [], 0.05)
            except InterruptedError:
                continue
            for f in ready:
                if f is self.listener:
                    conn, _ = self.listener.accept()
                    if self.client is not None:
                        sys.stderr.write("uart: unexpected client conn\n"); sys.stderr.flush()
                        conn.close()
                    else:
                        self.client = conn
                elif f is self.gfd:
                    try:
                        data = os.read(self.gfd, 65536)
                    except OSError:
                        data = b""
                    if not data and os.environ.get("FAKE_GUEST_RESPAWN"):
                        # init respawns the getty on the console: a fresh login prompt.
                        os.close(self.gfd)
                        self.gfd = None
                        self.sh.wait()
                        self.sh = None
                        self.prompt()
                        break
                    if not data:
                        stop["now"] = True   # the guest powered off
                        break
                    self.out(data)
                else:
                    try:
                        data = f.recv(65536) if isinstance(f, socket.socket) else os.read(f, 65536)
                    except OSError:
                        data = b""
                    if not data and isinstance(f, socket.socket):
                        sys.stderr.write("uart: closing client conn\n"); sys.stderr.flush()
                        self.client.close()
                        self.client = None
                    elif data:
                        self.typed(data)
        if self.sh:
            try:
                os.killpg(self.sh.pid, signal.SIGKILL)
            except OSError:
                pass
            self.sh.wait()
        if self.kind == "nmdm" and os.path.lexists(self.b):
            os.remove(self.b)
        with open(os.path.join(STATE, "bhyve-exits.jsonl"), "a") as f:
            f.write(json.dumps({"vm": self.vm, "orphaned": os.getppid() != parent}) + "\n")
        sys.exit(code)  # powered off: the kernel VM stays in /dev/vmm until bhyvectl --destroy


def hostname(args):
    """The guest's hostname(1): sets (recorded in FAKE_GUEST_STATE) or prints the name."""
    d = os.environ.get("FAKE_GUEST_STATE")
    if not d:
        fail("hostname: the fake guest has no FAKE_GUEST_STATE", 1)
    path = os.path.join(d, "hostname")
    if args:
        os.makedirs(d, exist_ok=True)
        with open(path, "w") as f:
            f.write(args[0] + "\n")
        return 0
    print(open(path).read().strip() if os.path.exists(path) else "image-host")
    return 0


TOOLS = {"zfs": zfs, "bhyvectl": bhyvectl, "ifconfig": ifconfig, "dladm": dladm, "pfexec": pfexec,
         "sudo": sudo, "doas": lambda a: pfexec([x for x in a if x != "-n"]), "kldstat": kldstat,
         "bhyveload": bhyveload, "dd": dd, "bhyve": bhyve, "p9kp": p9kp, "hostname": hostname}

if __name__ == "__main__":
    tool = os.environ.pop("FAKE_TOOL", None) or os.path.basename(sys.argv[0])
    if tool not in ("p9kp", "hostname"):
        if not STATE:
            sys.exit("FAKE_BHYVE_STATE is not set")
        log_command([tool] + sys.argv[1:])
    sys.exit(TOOLS[tool](sys.argv[1:]) or 0)
