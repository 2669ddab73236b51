/**
 * Meridian's browser SDK: join a Meridian room from any web page, framework-free.
 *
 * - {@link Room}: the connection (WebTransport with WebSocket fallback), joining,
 *   reconnecting (resume, backoff, node list, redirect, migrate, slow probing after
 *   giving up), ICE restarts of a dead media path while signaling stays up, publishing camera, microphone and screen, subscribing to everyone,
 *   active speaker and stats, as typed events ({@link RoomEvents}).
 * - {@link loginToRegion}: probe every region, log in, and get a node list (the chosen
 *   region first, then the fallback regions, each node with its region's token) that a
 *   {@link Room} walks when a whole region is gone.
 * - The wire protocol's types ({@link ClientMessage}, {@link ServerMessage}, …) are
 *   generated from the Rust crate `meridian-protocol` (ts-rs), so they cannot drift.
 * - The pure building blocks ({@link Reconnector}, {@link SignalingClient},
 *   {@link summarize}, {@link ActiveSpeakerDetector}) for other clients.
 *
 * ```ts
 * import { Room } from './sdk';
 * const room = new Room({ token, transport: 'auto' });
 * room.on('trackSubscribed', ({ participantId, source, track }) => attach(participantId, source, track));
 * room.on('trackUnsubscribed', ({ trackId }) => detach(trackId));
 * room.on('state', ({ state, detail }) => setStatus(state, detail.message));
 * await room.connect();
 * ```
 * @packageDocumentation
 */
export {
  Room,
  browserRtc,
  describeLeftReason,
  refreshDelayMs,
  tokenExpiresInSecs,
  SIMULCAST_ENCODINGS,
  type RoomEvents,
  type RoomOptions,
  type RemoteTrack,
  type RtcEnvironment,
} from './room';
export {
  Reconnector,
  DEFAULT_POLICY,
  backoffDelay,
  type AttemptResult,
  type ConnectionState,
  type ReconnectDeps,
  type ReconnectPolicy,
  type StateDetail,
} from './reconnect';
export {
  DEFAULT_ICE_RESTART_POLICY,
  IceRestartWatch,
  type IceAction,
  type IceRestartPolicy,
} from './restart';
export { SignalingClient, SignalingError, type JoinOutcome } from './signaling';
export {
  type NodeTarget,
  type Transport,
  type TransportFactory,
  type TransportKind,
  type TransportMode,
  type FallbackResult,
  type CertificateHashes,
  browserTransportFactory,
  connectWithFallback,
  openWebSocket,
  openWebTransport,
  originOfSignalUrl,
  targetFromUrl,
  transportOrder,
  webSocketUrl,
} from './transport';
export {
  type ConnectionQuality,
  type StatsEntry,
  type StatsSummary,
  type TileStats,
  connectionQuality,
  entriesOf,
  summarize,
} from './stats';
export {
  ActiveSpeakerDetector,
  DEFAULT_SPEAKER_POLICY,
  audioEnergies,
  type AudioEnergy,
  type SpeakerPolicy,
} from './speaker';
export {
  LoginRefused,
  MAX_REGIONS,
  MAX_RTT_SAMPLES,
  explainLogin,
  loginToRegion,
  median,
  nodesFromLogin,
  probeRegion,
  type LoginError,
  type LoginRequest,
  type LoginResponse,
  type ProbeOptions,
  type RegionProbe,
  type RegionRoute,
  type RegionList,
  type RegionLogin,
  type RegionRtt,
} from './region';
export { Emitter } from './events';
export * from './protocol';
