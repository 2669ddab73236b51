// When to restart ICE, as a pure state machine: a peer connection whose media path
// died while signaling stayed up is repaired by an ICE restart on the same participant
// (new ICE credentials; DTLS, tracks and ids stay), not by joining again. Time comes in
// as arguments, like the Rust client's `restart.rs`.

/** When the SDK restarts ICE on a peer connection whose media path died. */
export interface IceRestartPolicy {
  /** How long `iceConnectionState` may stay `disconnected` before a restart (ms); `failed` restarts at once. */
  disconnectedMs: number;
  /** Least time between two restarts of one connection (ms): a restart that did not help is tried again after it. */
  retryMs: number;
  /** Restarts of one outage after which the SDK gives up on the connection and joins afresh. */
  maxRestarts: number;
}

/** The default: restart after 2 s of `disconnected`, every 5 s, 4 times, then rejoin. */
export const DEFAULT_ICE_RESTART_POLICY: IceRestartPolicy = {
  disconnectedMs: 2000,
  retryMs: 5000,
  maxRestarts: 4,
};

/** What to do about a connection's path: nothing, an ICE restart, or a fresh join. */
export type IceAction = 'none' | 'restart' | 'rejoin';

/**
 * Follows one peer connection's `iceConnectionState` and decides when to restart ICE.
 *
 * ```ts
 * const watch = new IceRestartWatch();
 * pc.addEventListener('iceconnectionstatechange', () => watch.onState(pc.iceConnectionState, Date.now()));
 * if (watch.decide(Date.now(), signalingUp) === 'restart') { watch.restarted(Date.now()); pc.restartIce(); … }
 * ```
 */
export class IceRestartWatch {
  private connected = false;
  private downSince: number | null = null;
  private failed = false;
  private lastRestart: number | null = null;
  /** Restarts made in the current outage. */
  restarts = 0;

  constructor(private readonly policy: IceRestartPolicy = DEFAULT_ICE_RESTART_POLICY) {}

  /** The connection's `iceConnectionState` changed at `nowMs`. */
  onState(state: string, nowMs: number): void {
    switch (state) {
      case 'connected':
      case 'completed':
        this.connected = true;
        this.downSince = null;
        this.failed = false;
        this.restarts = 0;
        this.lastRestart = null;
        break;
      case 'disconnected':
        this.downSince ??= nowMs;
        break;
      case 'failed':
        this.downSince ??= nowMs;
        this.failed = true;
        break;
      default:
        // `checking` (during a restart) and `new` leave the outage as it is.
        break;
    }
  }

  /** Whether ICE connected at least once (a restart needs a path that worked). */
  get connectedOnce(): boolean {
    return this.connected;
  }

  /** Whether the path counts as dead at `nowMs`. */
  dead(nowMs: number): boolean {
    if (!this.connected || this.downSince === null) return false;
    return this.failed || nowMs - this.downSince >= this.policy.disconnectedMs;
  }

  /**
   * What to do at `nowMs`: `restart` when the path is dead, signaling is up and the last
   * restart is `retryMs` old; `rejoin` once `maxRestarts` restarts did not help.
   */
  decide(nowMs: number, signalingUp: boolean): IceAction {
    if (!signalingUp || !this.dead(nowMs)) return 'none';
    if (this.lastRestart !== null && nowMs - this.lastRestart < this.policy.retryMs) return 'none';
    return this.restarts >= this.policy.maxRestarts ? 'rejoin' : 'restart';
  }

  /** A restart was started at `nowMs`. */
  restarted(nowMs: number): void {
    this.lastRestart = nowMs;
    this.restarts++;
  }
}
