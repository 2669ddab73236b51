// Minimal Meridian browser client: WebSocket signaling, a publisher and a subscriber
// peer connection, camera + microphone with three simulcast layers.
export class MeridianClient {
  constructor({ url, token, publish, tiles, onStatus }) {
    this.url = url;
    this.token = token;
    this.publish = publish;
    this.tiles = tiles;
    this.onStatus = onStatus || (() => {});
    this.ws = null;
    this.pub = null;
    this.sub = null;
    this.participantId = null;
    this.tracks = new Map(); // mid on subscriber pc -> track info
    this.videos = new Map(); // track id -> <video>
    this.errors = [];
  }

  async start() {
    this.onStatus('connecting…');
    this.ws = new WebSocket(this.url);
    await new Promise((resolve, reject) => {
      this.ws.onopen = resolve;
      this.ws.onerror = () => reject(new Error('signaling connection failed'));
    });
    this.ws.onmessage = (ev) => this.onMessage(JSON.parse(ev.data)).catch((e) => {
      this.errors.push(String(e));
      this.onStatus('error: ' + e.message, true);
    });
    // Keep an error on screen: the server closes after a fatal one.
    this.ws.onclose = () => { if (!this.errors.length) this.onStatus('signaling closed'); };
    this.send({ type: 'join', token: this.token, client: 'meridian.js' });
  }

  send(msg) { this.ws.send(JSON.stringify(msg)); }

  async onMessage(msg) {
    switch (msg.type) {
      case 'joined':
        this.participantId = msg.participant_id;
        this.onStatus(`joined ${msg.room} as ${msg.participant_id}`);
        if (this.publish) await this.startPublishing();
        break;
      case 'answer':
        await this.pub.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
        break;
      case 'offer':
        await this.onSubscriberOffer(msg);
        break;
      case 'track_unpublished': {
        const v = this.videos.get(msg.track_id);
        if (v) { v.remove(); this.videos.delete(msg.track_id); }
        break;
      }
      case 'error':
        this.errors.push(msg.code);
        this.onStatus(`error ${msg.code}: ${msg.message}`, true);
        break;
      default:
        break;
    }
  }

  async startPublishing() {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: true,
      video: { width: 1280, height: 720, frameRate: 30 },
    });
    this.pub = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
    const announced = [];
    for (const track of stream.getTracks()) {
      const init = { direction: 'sendonly', streams: [stream] };
      if (track.kind === 'video') {
        init.sendEncodings = [
          { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150000 },
          { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500000 },
          { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1500000 },
        ];
      }
      const t = this.pub.addTransceiver(track, init);
      announced.push({ t, kind: track.kind });
    }
    const offer = await this.pub.createOffer();
    await this.pub.setLocalDescription(offer);
    const tracks = announced.map(({ t, kind }) => ({
      mid: t.mid,
      kind,
      source: kind === 'video' ? 'camera' : 'microphone',
      layers: kind === 'video' ? ['low', 'medium', 'high'] : [],
    }));
    this.send({ type: 'offer', sdp: this.pub.localDescription.sdp, tracks });
  }

  async onSubscriberOffer(msg) {
    if (!this.sub) {
      this.sub = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
      this.sub.ontrack = (ev) => {
        const info = this.tracks.get(ev.transceiver.mid);
        if (ev.track.kind !== 'video') {
          const a = new Audio();
          a.srcObject = new MediaStream([ev.track]);
          a.play().catch(() => {});
          return;
        }
        const v = document.createElement('video');
        v.autoplay = true;
        v.muted = true;
        v.playsInline = true;
        v.srcObject = new MediaStream([ev.track]);
        v.dataset.track = info ? info.track_id : ev.transceiver.mid;
        this.tiles.appendChild(v);
        if (info) this.videos.set(info.track_id, v);
      };
    }
    for (const t of msg.tracks) this.tracks.set(t.mid, t);
    await this.sub.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
    const answer = await this.sub.createAnswer();
    await this.sub.setLocalDescription(answer);
    this.send({ type: 'answer', sdp: this.sub.localDescription.sdp });
  }

  // Totals from getStats() on both connections, for tests and the page.
  async stats() {
    const out = { framesDecoded: 0, framesSent: 0, bytesReceived: 0, packetsLost: 0, inboundVideo: 0, outboundVideoLayers: 0 };
    if (this.sub) {
      (await this.sub.getStats()).forEach((r) => {
        if (r.type === 'inbound-rtp' && r.kind === 'video') {
          out.inboundVideo += 1;
          out.framesDecoded += r.framesDecoded || 0;
          out.bytesReceived += r.bytesReceived || 0;
          out.packetsLost += r.packetsLost || 0;
        }
      });
    }
    if (this.pub) {
      (await this.pub.getStats()).forEach((r) => {
        if (r.type === 'outbound-rtp' && r.kind === 'video') {
          out.framesSent += r.framesSent || 0;
          if ((r.framesSent || 0) > 0) out.outboundVideoLayers += 1;
        }
      });
    }
    return out;
  }

  leave() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.send({ type: 'leave' });
    if (this.pub) this.pub.close();
    if (this.sub) this.sub.close();
  }
}
