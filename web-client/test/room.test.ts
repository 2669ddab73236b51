// The SDK's public API (`src/sdk/index.ts`) against a scripted node: connect, publish,
// subscribe, screen share, reconnect with the resume token, slow probing after giving
// up, and the events an application sees (including a session replaced by the same
// identity). WebRTC and transports are fakes; nothing here needs a browser.
import { afterEach, describe, expect, it, vi } from 'vitest';
import {
  ActiveSpeakerDetector,
  type ConnectionState,
  type NodeTarget,
  type ReconnectPolicy,
  Room,
  type RoomEvents,
  type RoomOptions,
  type RtcEnvironment,
  type Transport,
  connectionQuality,
  refreshDelayMs,
  tokenExpiresInSecs,
} from '../src/sdk';
import { FakePeerConnection, FakeStream, FakeTrack, FakeTransport } from './fakes';

const FAST: ReconnectPolicy = { baseMs: 1, maxMs: 4, jitter: 0, maxAttempts: 3, initialAttempts: 2, maxRedirects: 3 };
const NODE: NodeTarget = { httpOrigin: 'http://node.test' };

type Msg = Record<string, unknown>;

/** A scripted node: answers join, offers and pings the way meridian does. */
class FakeNode {
  transports: FakeTransport[] = [];
  up = true;
  joins: Msg[] = [];
  offers: Msg[] = [];
  participantSeq = 1;
  trackSeq = 1;
  others: Msg[] = [];
  /** Override the answer to a join (e.g. an error). */
  onJoin: ((t: FakeTransport, m: Msg) => boolean) | null = null;

  factory = async (): Promise<Transport> => {
    if (!this.up) throw new Error('connection refused');
    const t = new FakeTransport('websocket', 'ws://node.test/signal');
    t.respond = (m) => this.handle(t, m);
    this.transports.push(t);
    return t;
  };

  get last(): FakeTransport {
    const t = this.transports[this.transports.length - 1];
    if (!t) throw new Error('no transport yet');
    return t;
  }

  private handle(t: FakeTransport, m: Msg): void {
    if (m.type === 'join') {
      this.joins.push(m);
      if (this.onJoin?.(t, m)) return;
      const resumed = typeof m.resume === 'string';
      t.deliver({
        type: 'joined',
        participant_id: resumed ? 'PA_1' : `PA_${this.participantSeq++}`,
        room: 'demo',
        participants: this.others,
        resume: `resume-${this.joins.length}`,
        resume_grace_secs: 10,
        version: 1,
        restored: false,
      });
    } else if (m.type === 'offer') {
      this.offers.push(m);
      const tracks = (m.tracks as Msg[]).map((a) => ({
        track_id: (a.track_id as string | undefined) ?? `TR_${this.trackSeq++}`,
        participant_id: 'PA_1',
        mid: a.mid,
        kind: a.kind,
        source: a.source,
        layers: a.layers,
        muted: false,
      }));
      t.deliver({ type: 'answer', sdp: 'v=0\r\nnode-answer', tracks });
    } else if (m.type === 'ping') {
      t.deliver({ type: 'pong', id: m.id });
    }
  }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
async function until(cond: () => boolean, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await tick(2);
  }
}

function fakeRtc(): RtcEnvironment & { cam: FakeStream; screen: FakeStream } {
  const cam = new FakeStream([new FakeTrack('audio'), new FakeTrack('video')]);
  const screen = new FakeStream([new FakeTrack('video')]);
  return {
    cam,
    screen,
    createPeerConnection: (c) => new FakePeerConnection(c) as unknown as RTCPeerConnection,
    getUserMedia: async () => cam as unknown as MediaStream,
    getDisplayMedia: async () => screen as unknown as MediaStream,
    webTransport: false,
  };
}

/** Records every event of a room. */
function record(room: Room) {
  const events: { [K in keyof RoomEvents]?: RoomEvents[K][] } = {};
  const names: (keyof RoomEvents)[] = ['state', 'participants', 'trackSubscribed', 'trackUnsubscribed', 'localStream', 'localScreen', 'muted', 'activeSpeaker', 'ended', 'notice'];
  for (const n of names) {
    room.on(n, (v: unknown) => { ((events[n] ??= []) as unknown[]).push(v); });
  }
  const states = () => (events.state ?? []).map((s) => s.state);
  return { events, states };
}

let rooms: Room[] = [];
afterEach(() => {
  for (const r of rooms) r.leave();
  rooms = [];
  FakePeerConnection.all = [];
});

function makeRoom(node: FakeNode, extra: Partial<RoomOptions> = {}) {
  const rtc = fakeRtc();
  const room = new Room({
    token: 'tok-1',
    nodes: [NODE],
    transportFactory: node.factory,
    policy: FAST,
    rtc,
    speakerIntervalMs: 0,
    probeIntervalMs: 0,
    ...extra,
  });
  rooms.push(room);
  return { room, rtc, rec: record(room) };
}

describe('Room (SDK public API)', () => {
  it('connects: sends join with the token and protocol version, emits connecting → connected and the participants', async () => {
    const node = new FakeNode();
    node.others = [{ participant_id: 'PB_1', identity: 'bob', name: 'Bob', tracks: [] }];
    const { room, rec } = makeRoom(node, { publish: false });
    await room.connect();
    expect(room.state).toBe('connected');
    expect(node.joins[0]).toMatchObject({ type: 'join', token: 'tok-1', version: 1, auto_subscribe: true });
    expect(rec.states()).toEqual(['connecting', 'connected']);
    expect(room.participantId).toBe('PA_1');
    expect(room.room).toBe('demo');
    expect(room.transportKind).toBe('websocket');
    expect(rec.events.participants?.at(-1)?.map((p) => p.name)).toEqual(['Bob']);
    expect(room.participants()).toHaveLength(1);
  });

  it('publishes camera (three simulcast layers) and microphone, then mutes through the node', async () => {
    const node = new FakeNode();
    const { room, rtc } = makeRoom(node);
    await room.connect();
    await until(() => room.ownTracks().length === 2);
    const offer = node.offers[0] as { tracks: Msg[] };
    expect(offer.tracks.map((t) => [t.kind, t.source, (t.layers as string[]).length])).toEqual([
      ['audio', 'microphone', 0],
      ['video', 'camera', 3],
    ]);
    expect(room.pub?.remoteDescription?.sdp).toContain('node-answer');
    room.setMuted('audio', true);
    const mic = room.ownTracks().find((t) => t.source === 'microphone');
    expect(node.last.sent.at(-1)).toEqual({ type: 'mute', track_id: mic?.track_id, muted: true });
    expect(rtc.cam.getAudioTracks()[0]?.enabled).toBe(false);
    expect(room.isMuted('audio')).toBe(true);
  });

  it('publishes a given stream (a pre-join preview) without asking for the camera again', async () => {
    const node = new FakeNode();
    const preview = new FakeStream([new FakeTrack('video')]);
    const rtc = fakeRtc();
    let asked = 0;
    rtc.getUserMedia = async () => { asked++; return rtc.cam as unknown as MediaStream; };
    const { room } = makeRoom(node, { rtc, media: preview as unknown as MediaStream });
    await room.connect();
    await until(() => room.ownTracks().length === 1);
    expect(asked).toBe(0);
    expect(room.ownTracks()[0]?.source).toBe('camera');
  });

  it('subscribes: the node\'s offer is answered and each track arrives with its publisher and source', async () => {
    const node = new FakeNode();
    node.others = [{
      participant_id: 'PB_1', identity: 'bob', name: null, tracks: [
        { track_id: 'TB_cam', participant_id: 'PB_1', mid: '0', kind: 'video', source: 'camera', layers: ['low', 'medium', 'high'], muted: false },
        { track_id: 'TB_scr', participant_id: 'PB_1', mid: '2', kind: 'video', source: 'screen', layers: [], muted: false },
      ],
    }];
    const { room, rec } = makeRoom(node, { publish: false });
    await room.connect();
    node.last.deliver({ type: 'offer', sdp: 'v=0\r\na=mid:0\r\na=mid:1', tracks: [
      { mid: '0', track_id: 'TB_cam', participant_id: 'PB_1' },
      { mid: '1', track_id: 'TB_scr', participant_id: 'PB_1' },
    ] });
    await until(() => node.last.sent.some((m) => (m as Msg).type === 'answer'));
    const got = rec.events.trackSubscribed ?? [];
    expect(got.map((t) => [t.participantId, t.trackId, t.source])).toEqual([
      ['PB_1', 'TB_cam', 'camera'],
      ['PB_1', 'TB_scr', 'screen'],
    ]);
    expect(room.participantOfTrack('TB_scr')).toBe('PB_1');
    node.last.deliver({ type: 'track_muted', track_id: 'TB_cam', muted: true });
    node.last.deliver({ type: 'track_unpublished', track_id: 'TB_scr' });
    await tick();
    expect(rec.events.muted?.at(-1)).toEqual({ trackId: 'TB_cam', muted: true, participantId: 'PB_1', local: false });
    expect(rec.events.trackUnsubscribed?.map((t) => t.trackId)).toContain('TB_scr');
  });

  it('media that arrives before its track_published waits for it, so a screen share is known as one', async () => {
    const node = new FakeNode();
    node.others = [{ participant_id: 'PB_1', identity: 'bob', name: 'Bob', tracks: [] }];
    const { room, rec } = makeRoom(node, { publish: false });
    await room.connect();
    node.last.deliver({ type: 'offer', sdp: 'v=0\r\na=mid:0', tracks: [{ mid: '0', track_id: 'TB_scr', participant_id: 'PB_1' }] });
    await until(() => node.last.sent.some((m) => (m as Msg).type === 'answer'));
    expect(rec.events.trackSubscribed ?? []).toHaveLength(0);
    node.last.deliver({ type: 'track_published', track: { track_id: 'TB_scr', participant_id: 'PB_1', mid: '3', kind: 'video', source: 'screen', layers: [], muted: false } });
    await tick();
    expect(rec.events.trackSubscribed?.map((t) => [t.trackId, t.source])).toEqual([['TB_scr', 'screen']]);
  });

  it('shares a screen as a `screen` track on the publisher connection and unpublishes it when stopped', async () => {
    const node = new FakeNode();
    const { room, rtc, rec } = makeRoom(node);
    await room.connect();
    await until(() => room.ownTracks().length === 2);
    await room.startScreenShare();
    expect(room.sharingScreen).toBe(true);
    expect((node.offers[1] as { tracks: Msg[] }).tracks).toEqual([{ mid: '2', kind: 'video', source: 'screen', layers: [] }]);
    const screen = room.ownTracks().find((t) => t.source === 'screen');
    expect(screen).toBeDefined();
    expect(rec.events.localScreen?.[0]).toBe(rtc.screen);
    // The browser's own "Stop sharing" ends the track.
    rtc.screen.getVideoTracks()[0]?.end();
    await until(() => !room.sharingScreen);
    expect(node.last.sent.some((m) => (m as Msg).type === 'unpublish' && (m as Msg).track_id === screen?.track_id)).toBe(true);
    expect(rec.events.localScreen?.at(-1)).toBeNull();
  });

  it('reconnects by itself after a drop and resumes with the resume token', async () => {
    const node = new FakeNode();
    const { room, rec } = makeRoom(node, { publish: false });
    await room.connect();
    node.last.drop();
    await until(() => room.state === 'connected' && node.joins.length === 2);
    expect(node.joins[1]).toMatchObject({ type: 'join', resume: 'resume-1' });
    expect(rec.states()).toEqual(['connecting', 'connected', 'reconnecting', 'reconnecting', 'connected']);
    expect(room.resumedCount).toBe(1);
    expect(room.participantId).toBe('PA_1');
  });

  it('after giving up on an unreachable node, probes it slowly and rejoins when it is back', async () => {
    const node = new FakeNode();
    let probes = 0;
    const { room, rec } = makeRoom(node, {
      publish: false,
      probeIntervalMs: 5,
      probe: async () => { probes++; return node.up; },
    });
    await room.connect();
    node.up = false;
    node.last.drop();
    await until(() => room.state === 'disconnected');
    const gaveUp = rec.events.state?.at(-1);
    expect(gaveUp?.detail.fatal).toBeFalsy();
    expect(gaveUp?.detail.message).toMatch(/gave up after 3 attempts/);
    await until(() => probes >= 2);
    expect(room.state).toBe('disconnected');
    node.up = true;
    await until(() => room.state === 'connected');
    expect(rec.events.notice).toContain('the node answers again; rejoining');
  });

  it('a session replaced by the same identity ends with the reason and does not come back', async () => {
    const node = new FakeNode();
    let probes = 0;
    const { room, rec } = makeRoom(node, { publish: false, probeIntervalMs: 5, probe: async () => { probes++; return true; } });
    await room.connect();
    node.last.deliver({ type: 'left', reason: 'replaced' });
    await until(() => room.state === 'disconnected');
    expect(rec.events.ended).toEqual([{ reason: 'replaced', message: expect.stringMatching(/same identity from another page/) }]);
    expect(rec.events.state?.at(-1)?.detail.fatal).toBe(true);
    await tick(30);
    expect(probes).toBe(0);
    expect(node.joins).toHaveLength(1);
  });

  it('reads a token\'s expiry and refreshes a minute early, or at half its life when shorter', () => {
    const now = 1_700_000_000_000;
    const payload = btoa(JSON.stringify({ exp: now / 1000 + 600, sub: 'ann' })).replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
    expect(tokenExpiresInSecs(`h.${payload}.s`, now)).toBe(600);
    expect(tokenExpiresInSecs('not-a-jwt', now)).toBeUndefined();
    expect(tokenExpiresInSecs('h.%%%.s', now)).toBeUndefined();
    expect(refreshDelayMs(600)).toBe(540_000);
    expect(refreshDelayMs(60)).toBe(30_000);
    expect(refreshDelayMs(1)).toBe(5_000);
  });

  it('sends `refresh` with a fresh token before the token expires, and again after `refreshed`', async () => {
    vi.useFakeTimers({ shouldAdvanceTime: true });
    try {
      const exp = Math.floor(Date.now() / 1000) + 120;
      const token = `h.${btoa(JSON.stringify({ exp })).replace(/=+$/, '')}.s`;
      let minted = 0;
      const node = new FakeNode();
      const { room } = makeRoom(node, { publish: false, token, refreshToken: async () => `tok-new-${++minted}` });
      await room.connect();
      const refreshes = () => node.last.sent.filter((m) => (m as Msg).type === 'refresh');
      await vi.advanceTimersByTimeAsync(50_000);
      expect(refreshes()).toHaveLength(0);
      await vi.advanceTimersByTimeAsync(15_000);
      expect(refreshes()).toEqual([{ type: 'refresh', token: 'tok-new-1' }]);
      node.last.deliver({ type: 'refreshed', expires_in_secs: 20 });
      await vi.advanceTimersByTimeAsync(11_000);
      expect(refreshes()).toEqual([{ type: 'refresh', token: 'tok-new-1' }, { type: 'refresh', token: 'tok-new-2' }]);
      expect(room.state).toBe('connected');
    } finally {
      vi.useRealTimers();
    }
  });

  it('a refused token ends in `disconnected` (fatal) without retries', async () => {
    const node = new FakeNode();
    node.onJoin = (t) => { t.deliver({ type: 'error', code: 'unauthorized', message: 'token_invalid' }); return true; };
    const { room, rec } = makeRoom(node, { publish: false });
    await room.connect();
    expect(room.state).toBe('disconnected');
    expect(rec.events.state?.at(-1)?.detail.fatal).toBe(true);
    expect(node.joins).toHaveLength(1);
  });

  it('emits participants as people join and leave, and stops on leave()', async () => {
    const node = new FakeNode();
    const { room, rec } = makeRoom(node, { publish: false });
    await room.connect();
    node.last.deliver({ type: 'participant_joined', participant: { participant_id: 'PC_1', identity: 'carol', name: 'Carol', tracks: [] } });
    node.last.deliver({ type: 'participant_left', participant_id: 'PC_1' });
    await tick();
    expect(rec.events.participants?.map((l) => l.length)).toEqual([0, 1, 0]);
    const t = node.last;
    room.leave();
    expect(room.state).toBe('left' satisfies ConnectionState);
    expect(t.sent.at(-1)).toEqual({ type: 'leave' });
  });
});

describe('active speaker and quality', () => {
  const sample = (e: Record<string, [number, number]>) =>
    Object.entries(e).map(([participantId, [totalAudioEnergy, totalSamplesDuration]]) => ({ participantId, source: `in-${participantId}`, totalAudioEnergy, totalSamplesDuration }));

  it('picks the loudest participant, keeps it against a slightly louder one, and moves when it goes quiet', () => {
    const d = new ActiveSpeakerDetector({ threshold: 1e-4, switchRatio: 1.5, smoothing: 0 });
    d.update(sample({ a: [0, 0], b: [0, 0] }));
    expect(d.update(sample({ a: [0.01, 1], b: [0.002, 1] }))).toBe('a');
    expect(d.update(sample({ a: [0.02, 2], b: [0.014, 2] }))).toBe('a'); // b 1.2× louder: no switch
    expect(d.update(sample({ a: [0.02, 3], b: [0.024, 3] }))).toBe('b'); // a muted
    expect(d.update(sample({ a: [0.02, 4], b: [0.024, 4] }))).toBeNull(); // silence
  });

  it('reads each participant\'s counters per stats entry: a stale entry of an old SSRC does not mix into the live one', () => {
    // Seen in Chromium: after a stream's SSRC changes, getStats keeps the old SSRC's
    // inbound-rtp (counters frozen) next to the new one, both with the same mid. Mixing
    // the two gave averages over the whole call, so a long speaker kept the highlight.
    const d = new ActiveSpeakerDetector({ threshold: 1e-4, switchRatio: 1.5, smoothing: 0 });
    const at = (t: number, a: number, bLive: number) => [
      { participantId: 'a', source: 'a-old', totalAudioEnergy: 0, totalSamplesDuration: 5 },
      { participantId: 'a', source: 'a-new', totalAudioEnergy: a, totalSamplesDuration: t },
      { participantId: 'b', source: 'b-old', totalAudioEnergy: 0, totalSamplesDuration: 4 },
      { participantId: 'b', source: 'b-new', totalAudioEnergy: bLive, totalSamplesDuration: t },
    ];
    d.update(at(40, 10, 0));
    expect(d.update(at(41, 10.5, 0))).toBe('a');
    // a mutes (its counters stop), b speaks quietly: b within one sample.
    expect(d.update(at(42, 10.5, 0.01))).toBe('b');
    expect(d.powers().get('a')).toBe(0);
  });

  it('grades connection quality from loss and RTT', () => {
    expect(connectionQuality(0, 20)).toBe('good');
    expect(connectionQuality(3, 20)).toBe('fair');
    expect(connectionQuality(0, 250)).toBe('fair');
    expect(connectionQuality(10, 20)).toBe('poor');
    expect(connectionQuality(0, undefined)).toBe('good');
  });
});
