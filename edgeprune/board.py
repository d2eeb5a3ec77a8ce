"""The scripts an SSH device runs on the board with the board's own Python (``python3 -c SCRIPT``).

Plain text, not modules: the board has Python, numpy and a runtime, never edgeprune. Both use only the standard
library (BOARD imports numpy only to check that the board has it), so they run on any Python 3 the board has.
"""

# A JSON request on stdin, one JSON line on stdout. "open" makes a marked folder, "scan" (with "numpy": the connect
# check) lists the marked folders, "remove" kills their runners and removes them. A folder counts only if it is a
# real folder of this user holding a regular marker file of this user.
BOARD = r"""
import glob, json, os, shutil, signal, stat, sys, tempfile, time
MARK, uid = "edgeprune-owner.json", os.getuid()

try:
    BOOT = open("/proc/sys/kernel/random/boot_id").read().strip()
except OSError:
    BOOT = None

def owner(folder):
    try:
        info, mark = os.lstat(folder), os.lstat(os.path.join(folder, MARK))
        if not stat.S_ISDIR(info.st_mode) or not stat.S_ISREG(mark.st_mode) or {info.st_uid, mark.st_uid} != {uid}:
            return None
        record = json.loads(open(os.path.join(folder, MARK)).read(4096))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None

def expired(record):
    # By the board's monotonic clock (no jump when NTP sets the time); a folder of an earlier boot has no runner left.
    try:
        lasted = time.monotonic() - float(record["clock"]) > float(record["lease"])
        return record["boot"] is not None and (record["boot"] != BOOT or lasted)
    except (KeyError, TypeError, ValueError):
        return False

def kill(folder):
    # The runner's process group, only once its leader is seen running this folder's runner.py.
    try:
        pid = int(open(os.path.join(folder, "runner.pid")).read(32))
        argv = open("/proc/%d/cmdline" % pid, "rb").read().split(b"\0")
        if pid > 1 and os.path.join(folder, "runner.py").encode() in argv:
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass

request, answer = json.loads(sys.stdin.read(1 << 20)), {}
if request["do"] == "open":
    answer["folder"] = made = tempfile.mkdtemp(prefix="edgeprune.")
    for name in request["subfolders"]:
        os.mkdir(os.path.join(made, name))
    with open(os.path.join(made, MARK + ".tmp"), "w") as f:
        json.dump(dict(request["owner"], boot=BOOT, clock=time.monotonic()), f)
    os.replace(os.path.join(made, MARK + ".tmp"), os.path.join(made, MARK))  # whole, or not there at all
if request["do"] == "remove":
    for folder in request["folders"]:
        if os.path.isabs(folder) and os.path.basename(folder).startswith("edgeprune.") and owner(folder) is not None:
            kill(folder)
            shutil.rmtree(folder, ignore_errors=True)
else:
    answer["others"] = []
    for folder in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), "edgeprune.*")):
        record = owner(folder)
        if record is not None and folder != answer.get("folder"):
            answer["others"].append({"folder": folder, "host": record.get("host"), "pid": record.get("pid"),
                                     "expired": expired(record)})
if request.get("numpy"):
    import numpy
print(json.dumps(answer))
"""

# Starts the runner as the leader of a process group of its own and leaves its pid in the folder, so that clean-up
# can kill the whole run (the runtime, trtexec) on the board when the local ssh gave up waiting for it.
LAUNCH = """
import os, sys
try:
    os.setpgid(0, 0)  # a session leader already leads its group, and may not change it
except OSError:
    pass
pid = os.path.join(os.path.dirname(sys.argv[1]), "runner.pid")
with open(pid + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid + ".tmp", pid)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""
