// The connection state machine: connect, and when signaling or media drops, reconnect
// by itself with the resume token, exponential backoff with jitter, a bounded number of
// attempts, across the configured nodes; follows `redirect` and `migrate`. Pure: time,
// randomness and the connect attempt itself are injected, so tests drive it.
import type { JoinedMessage } from './protocol';
import { type NodeTarget, targetFromUrl } from './transport';

/** Where the connection stands; the page shows it. */
export type ConnectionState = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'disconnected' | 'left';

/** Backoff and bounds. */
export interface ReconnectPolicy {
  /** First retry delay, ms. */
  baseMs: number;
  /** Largest delay, ms. */
  maxMs: number;
  /** Fraction of each delay that is random: delay ∈ [d·(1−jitter), d]. */
  jitter: number;
  /** Attempts after a drop before giving up. */
  maxAttempts: number;
  /** Attempts for the very first connection (a node that is down fails fast). */
  initialAttempts: number;
  /** Redirects / migrations followed in a row before giving up (loop guard). */
  maxRedirects: number;
}

/** Defaults: 0.5 s doubling to 8 s, half of it jitter, 8 attempts (≈ 40 s at most). */
export const DEFAULT_POLICY: ReconnectPolicy = {
  baseMs: 500,
  maxMs: 8000,
  jitter: 0.5,
  maxAttempts: 8,
  initialAttempts: 3,
  maxRedirects: 5,
};

/** Delay before attempt `attempt` (1-based), with jitter from `random()` ∈ [0, 1). */
export function backoffDelay(attempt: number, policy: ReconnectPolicy, random: () => number): number {
  const exp = Math.min(policy.maxMs, policy.baseMs * 2 ** Math.max(0, attempt - 1));
  const r = Math.min(Math.max(random(), 0), 1);
  return Math.round(exp * (1 - policy.jitter) + exp * policy.jitter * r);
}

/** What one connect attempt came to. */
export type AttemptResult =
  | { kind: 'joined'; joined: JoinedMessage }
  | { kind: 'redirect'; url: string }
  /** Retry may help: the node is unreachable, closed, timed out, or said `internal`. */
  | { kind: 'failed'; message: string }
  /** The resume token is no longer valid: the next attempt joins afresh. */
  | { kind: 'resume_failed'; message: string }
  /** Retrying cannot help (bad or expired token, forbidden, wrong version). */
  | { kind: 'fatal'; message: string };

/** Detail shown with a state. */
export interface StateDetail {
  /** Human sentence. */
  message: string;
  /** Attempt number of the current cycle (reconnecting). */
  attempt?: number;
  /** Bound on attempts (reconnecting). */
  maxAttempts?: number;
  /** Delay before the next attempt, ms. */
  delayMs?: number;
  /** Node being tried. */
  target?: NodeTarget;
  /**
   * On `disconnected`: retrying cannot help (bad or expired token, forbidden, the
   * session was replaced, redirect loop). Absent or false: the node was unreachable,
   * and probing it later may succeed ({@link Reconnector.restart}).
   */
  fatal?: boolean;
}

/** What the machine needs from the outside world. */
export interface ReconnectDeps {
  /**
   * Nodes to try in turn (at least one). Nodes from a login (`nodesFromLogin`)
   * list the chosen region's nodes first, then each fallback region's: when every
   * node of a region fails the walk reaches the next region, joining there afresh.
   */
  nodes: NodeTarget[];
  /** Opens signaling to `target` and joins, with `resume` when resuming. */
  attempt: (target: NodeTarget, resume: string | undefined) => Promise<AttemptResult>;
  /** Resolves after `ms`. */
  sleep: (ms: number) => Promise<void>;
  /** Uniform in [0, 1). */
  random: () => number;
  /** Each state change. */
  onstate: (state: ConnectionState, detail: StateDetail) => void;
  /** A join or resume succeeded on `target`. */
  onjoined: (joined: JoinedMessage, target: NodeTarget, resumed: boolean) => void;
  policy?: ReconnectPolicy;
}

/** The reconnecting connection. */
export class Reconnector {
  /** Current state. */
  state: ConnectionState = 'idle';
  /** The resume token of the current session, from the last `joined`. */
  resumeToken: string | undefined;
  /** Attempts made in the current cycle. */
  attempts = 0;
  /** The region of the node last joined (nodes from a login name theirs). */
  region: string | undefined;
  private readonly policy: ReconnectPolicy;
  private nodeIndex = 0;
  private override: NodeTarget | undefined;
  private cycle = 0; // bumps to cancel a running loop
  private running = false;

  constructor(private readonly deps: ReconnectDeps) {
    if (deps.nodes.length === 0) throw new Error('at least one node is needed');
    this.policy = deps.policy ?? DEFAULT_POLICY;
  }

  /** The node the next attempt goes to. */
  get currentTarget(): NodeTarget {
    return this.override ?? (this.deps.nodes[this.nodeIndex % this.deps.nodes.length] as NodeTarget);
  }

  /** First connection. Resolves when connected, or when it gave up (state `disconnected`). */
  start(): Promise<void> {
    return this.run('connecting', this.policy.initialAttempts, false);
  }

  /** Signaling or media dropped: reconnect with the resume token. No-op unless connected. */
  lost(reason: string): Promise<void> {
    if (this.state !== 'connected') return Promise.resolve();
    return this.run('reconnecting', this.policy.maxAttempts, false, reason);
  }

  /** The node asked us to move (`migrate`): reconnect at once, to `url` when given. */
  migrate(target: NodeTarget | undefined, reason: string): Promise<void> {
    if (this.state === 'left' || this.state === 'disconnected') return Promise.resolve();
    if (target) this.override = target;
    return this.run('reconnecting', this.policy.maxAttempts, true, `node asked to move (${reason || 'migrate'})`);
  }

  /**
   * After giving up (`disconnected`, not fatal): run a new reconnect cycle at once,
   * with the resume token when there is one. No-op in any other state.
   */
  restart(reason = 'trying again'): Promise<void> {
    if (this.state !== 'disconnected') return Promise.resolve();
    return this.run('reconnecting', this.policy.maxAttempts, true, reason);
  }

  /** Ends the session from outside (e.g. the node said it was replaced): `disconnected`. */
  end(message: string, fatal: boolean): void {
    this.cycle++;
    this.running = false;
    this.set('disconnected', { message, fatal });
  }

  /** The user left: stop everything. */
  leave(): void {
    this.cycle++;
    this.running = false;
    this.set('left', { message: 'You left the room.' });
  }

  private set(state: ConnectionState, detail: StateDetail): void {
    this.state = state;
    this.deps.onstate(state, detail);
  }

  private async run(state: 'connecting' | 'reconnecting', maxAttempts: number, immediate: boolean, why?: string): Promise<void> {
    const cycle = ++this.cycle;
    this.running = true;
    this.attempts = 0;
    let redirects = 0;
    let wait = !immediate && state === 'reconnecting';
    let lastError = why ?? '';
    while (cycle === this.cycle) {
      if (this.attempts >= maxAttempts) {
        this.running = false;
        this.set('disconnected', {
          message: `Disconnected: gave up after ${this.attempts} attempt${this.attempts === 1 ? '' : 's'}${lastError ? ` (${lastError})` : ''}.`,
          attempt: this.attempts,
          maxAttempts,
        });
        return;
      }
      this.attempts++;
      const target = this.currentTarget;
      // Another region keeps another log: a resume token of the old one means nothing there.
      if (target.region !== undefined && this.region !== undefined && target.region !== this.region) {
        this.resumeToken = undefined;
      }
      if (wait) {
        const delayMs = backoffDelay(this.attempts, this.policy, this.deps.random);
        this.set(state, {
          message: `${state === 'connecting' ? 'Connecting' : 'Reconnecting'}… attempt ${this.attempts} of ${maxAttempts} in ${(delayMs / 1000).toFixed(1)} s${lastError ? ` (${lastError})` : ''}`,
          attempt: this.attempts,
          maxAttempts,
          delayMs,
          target,
        });
        await this.deps.sleep(delayMs);
        if (cycle !== this.cycle) return;
      }
      this.set(state, {
        message: `${state === 'connecting' ? 'Connecting' : 'Reconnecting'}… (attempt ${this.attempts} of ${maxAttempts})${lastError ? ` — ${lastError}` : ''}`,
        attempt: this.attempts,
        maxAttempts,
        target,
      });
      let result: AttemptResult;
      try {
        result = await this.deps.attempt(target, this.resumeToken);
      } catch (e) {
        result = { kind: 'failed', message: e instanceof Error ? e.message : String(e) };
      }
      if (cycle !== this.cycle) return;
      switch (result.kind) {
        case 'joined': {
          const resumed = this.resumeToken !== undefined;
          this.resumeToken = result.joined.resume;
          if (target.region !== undefined) this.region = target.region;
          // Stay on the node that took us.
          if (this.override) {
            this.override = target;
          } else {
            this.nodeIndex = this.deps.nodes.indexOf(target) >= 0 ? this.deps.nodes.indexOf(target) : this.nodeIndex;
          }
          this.running = false;
          this.set('connected', { message: `Connected to room ${result.joined.room}.`, target });
          this.deps.onjoined(result.joined, target, resumed);
          return;
        }
        case 'redirect':
          redirects++;
          if (redirects > this.policy.maxRedirects) {
            this.running = false;
            this.set('disconnected', { message: `Disconnected: too many redirects (last to ${result.url}).`, fatal: true });
            return;
          }
          try {
            this.override = targetFromUrl(result.url);
          } catch {
            this.running = false;
            this.set('disconnected', { message: `Disconnected: redirected to an unusable URL ${JSON.stringify(result.url)}.`, fatal: true });
            return;
          }
          this.attempts--; // a redirect is not a failure
          wait = false;
          lastError = `redirected to ${result.url}`;
          continue;
        case 'resume_failed':
          this.resumeToken = undefined;
          lastError = `${result.message}; joining afresh`;
          wait = false;
          continue;
        case 'fatal':
          this.running = false;
          this.set('disconnected', { message: result.message, fatal: true });
          return;
        case 'failed':
          lastError = result.message;
          // Next node in the list; a migrate/redirect target is dropped after it failed.
          if (this.override) this.override = undefined;
          else this.nodeIndex = (this.nodeIndex + 1) % this.deps.nodes.length;
          wait = true;
          continue;
      }
    }
  }

  /** Whether a connect loop is running. */
  get busy(): boolean {
    return this.running;
  }
}
