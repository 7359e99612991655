// Generates the TypeScript stubs into src/gen with buf and the repository's buf.gen.yaml
// (local plugins only). buf is the one `make setup` installs (.venv/bin/buf), or the one
// named by BUF, or buf on the PATH.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const venvBuf = join(root, ".venv", "bin", "buf");
const buf = process.env.BUF || (existsSync(venvBuf) ? venvBuf : "buf");

// Plugin paths in buf.gen.yaml are relative to the repository root.
const run = spawnSync(buf, ["generate", "--template", "buf.gen.yaml"], { cwd: root, stdio: "inherit" });
if (run.error) {
  console.error(`generate: cannot run ${buf} (${run.error.message}); run make setup or set BUF`);
  process.exit(1);
}
process.exit(run.status ?? 1);
