"""Demo: scenario 2 (full restore) with a short human report. Starts the whole
environment, restores, prints, and leaves nothing running."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402
import objects as o  # noqa: E402


def main() -> int:
    with harness.Cluster() as cluster:
        cluster.apply(o.workload("prod"))
        cluster.backup("demo-backup", "prod")
        cluster.delete_namespace("prod")
        watches = [harness.Watch(cluster, f"/apis/vmoperator.vmware.com/v1alpha5/{r}")
                   for r in ("virtualmachinegroups", "virtualmachines")]
        started = time.time()
        restore = cluster.restore("demo-restore", "demo-backup")
        took = time.time() - started
        harness.wait_until(lambda: len(watches[1].added()) >= 3, 20, "VM watch events")
        for watch in watches:
            watch.stop()
        created = sorted(((int(x["metadata"]["resourceVersion"]), x["kind"], x["metadata"]["name"])
                          for w in watches for x in w.added() if x["metadata"]["namespace"] == "prod"))
        print("\n=== velero-vm-restore-webhook demo: velero restore create --from-backup demo-backup ===")
        print(f"Restore phase: {restore['status']['phase']} in {took:.1f}s "
              f"({restore['status'].get('progress', {}).get('itemsRestored', '?')} items, "
              f"{restore['status'].get('errors', 0)} errors, {restore['status'].get('warnings', 0)} warnings)")
        print("Creation order (groups before the VMs that name them):")
        for i, (_, kind, name) in enumerate(created, 1):
            print(f"  {i}. {kind} prod/{name}")
        print("What the webhook changed:")
        changes = {}
        for entry in cluster.webhook_log():
            if entry.get("restore") == "demo-restore" and entry.get("rule"):
                changes.setdefault(entry["object"], []).append(entry["message"])
        for obj in sorted(changes):
            print(f"  {obj}")
            for message in changes[obj]:
                print(f"    - {message}")
        untouched = [f"{k} prod/{n}" for _, k, n in created if f"{k} prod/{n}" not in changes]
        if untouched:
            print(f"  unchanged: {', '.join(untouched)}")
        ok = restore["status"]["phase"] == "Completed"
    print("Everything stopped and removed." if ok else "Restore did not complete.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
