// Settings from the environment, read once and checked before any call (README.md lists them).
import { readFileSync } from "node:fs";

export interface Config {
  readonly ingestAddress: string;
  readonly queryAddress: string;
  /** PEM of the CA that signed the services' certificates. */
  readonly ca: Buffer;
  /** PEM client certificate and key, for a service that requires mutual TLS; both or neither. */
  readonly clientCert: Buffer | undefined;
  readonly clientKey: Buffer | undefined;
  /** TLS server name to verify instead of the address's host (a tunnel, a proxy). */
  readonly serverName: string | undefined;
  readonly departmentToken: string;
  readonly reviewerToken: string;
  /** The department submitting; its token's subject must be this id. */
  readonly department: string;
  /** The resident id the events are about and whose score is read. */
  readonly subjectId: string;
  /** Why the reviewer reads (config/purposes.yaml: a code a reviewer may state). */
  readonly purpose: string;
  /** Prefix of the event ids; unique per run by default, so every run submits new events. */
  readonly eventIdPrefix: string;
  /** Deadline of every call. */
  readonly deadlineMs: number;
  /** How long to wait for the submitted events to reach the score. */
  readonly scoreWaitMs: number;
}

export class ConfigError extends Error {}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const problems: string[] = [];
  const required = (name: string): string => {
    const value = env[name]?.trim();
    if (!value) {
      problems.push(`${name} is required`);
      return "";
    }
    return value;
  };
  const readFile = (name: string, path: string): Buffer | undefined => {
    if (!path) return undefined;
    try {
      return readFileSync(path);
    } catch (error) {
      problems.push(`${name}: cannot read ${path} (${(error as Error).message})`);
      return undefined;
    }
  };
  const seconds = (name: string, fallback: number): number => {
    const raw = env[name]?.trim();
    if (!raw) return fallback * 1000;
    const value = Number(raw);
    if (!Number.isFinite(value) || value <= 0) {
      problems.push(`${name} must be a positive number of seconds, not ${JSON.stringify(raw)}`);
    }
    return value * 1000;
  };
  const token = (name: string): string => readFile(name, required(name))?.toString("utf8").trim() ?? "";

  const certPath = env.EGRET_CLIENT_CERT_FILE?.trim() ?? "";
  const keyPath = env.EGRET_CLIENT_KEY_FILE?.trim() ?? "";
  if (Boolean(certPath) !== Boolean(keyPath)) {
    problems.push("EGRET_CLIENT_CERT_FILE and EGRET_CLIENT_KEY_FILE go together: set both or neither");
  }
  const config: Config = {
    ingestAddress: env.EGRET_INGEST_ADDRESS?.trim() || "127.0.0.1:50051",
    queryAddress: env.EGRET_QUERY_ADDRESS?.trim() || "127.0.0.1:50054",
    ca: readFile("EGRET_CA_FILE", required("EGRET_CA_FILE")) ?? Buffer.alloc(0),
    clientCert: readFile("EGRET_CLIENT_CERT_FILE", certPath),
    clientKey: readFile("EGRET_CLIENT_KEY_FILE", keyPath),
    serverName: env.EGRET_TLS_SERVER_NAME?.trim() || undefined,
    departmentToken: token("EGRET_DEPARTMENT_TOKEN_FILE"),
    reviewerToken: token("EGRET_REVIEWER_TOKEN_FILE"),
    department: env.EGRET_DEPARTMENT?.trim() || "library",
    subjectId: env.EGRET_SUBJECT_ID?.trim() || "350200199001011230",
    purpose: env.EGRET_PURPOSE?.trim() || "subject-request",
    eventIdPrefix: env.EGRET_EVENT_ID_PREFIX?.trim() || `node-example-${Date.now()}-`,
    deadlineMs: seconds("EGRET_DEADLINE_SECONDS", 10),
    scoreWaitMs: seconds("EGRET_SCORE_WAIT_SECONDS", 60),
  };
  if (problems.length > 0) {
    throw new ConfigError(problems.join("; "));
  }
  return config;
}
