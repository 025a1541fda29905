// Meta numbers' WebRTC leg: the page's RTCPeerConnection to the bot, which bridges it to the call
// (bot/softphone/bridge.py). The page offers, with every ICE candidate gathered (the bot's
// signalling has no trickle), to POST api/calls/{id}/webrtc; the bot answers. The microphone
// track goes up; the callee's audio comes down and is played.
//
// window.callbotWebRTC.start({callId, initData, stream, iceServers, onRemoteStream, onEnded})
//   → Promise of {pc, mute(muted), close()}. `iceServers` are the session JSON's ice_servers
//   (STUN/TURN; TURN credentials only reach a page allowed to join this call).
//   onRemoteStream(stream): the callee's audio, once it arrives (also played by a hidden
//   <audio> element unless the page plays it itself through WebAudio: then that element stays
//   muted, still needed by Chrome for a remote stream to reach WebAudio).
//   onEnded(reason): the leg is over; reason null when closed on purpose, else a short code.
(function () {
  "use strict";

  const GATHER_TIMEOUT_MS = 3000; // a candidate that comes later is not worth the wait

  function base() {
    return location.pathname.replace(/[^/]*$/, "");
  }

  async function post(callId, initData, path, body) {
    const response = await fetch(`${base()}api/calls/${encodeURIComponent(callId)}/${path}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `tma ${initData}` },
      body: JSON.stringify(body),
    });
    let json = {};
    try {
      json = await response.json();
    } catch (_err) {
      json = {};
    }
    if (!response.ok) {
      const err = new Error(json.error || `http_${response.status}`);
      err.status = response.status;
      throw err;
    }
    return json;
  }

  function gathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (pc.iceGatheringState !== "complete") return;
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, GATHER_TIMEOUT_MS);
    });
  }

  async function start({ callId, initData, stream, iceServers, onRemoteStream, onEnded }) {
    const pc = new RTCPeerConnection({ iceServers: iceServers || [] });
    const player = new Audio();
    player.autoplay = true;
    player.muted = Boolean(onRemoteStream);
    let over = false;
    const end = (reason) => {
      if (over) return;
      over = true;
      player.srcObject = null;
      pc.close();
      if (onEnded) onEnded(reason);
    };
    pc.ontrack = (event) => {
      const remote = event.streams[0] || new MediaStream([event.track]);
      player.srcObject = remote;
      player.play().catch(() => {});
      if (onRemoteStream) onRemoteStream(remote);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") end("webrtc_failed");
      else if (pc.connectionState === "closed") end(null);
    };
    for (const track of stream.getAudioTracks()) pc.addTrack(track, stream);
    if (!stream.getAudioTracks().length) pc.addTransceiver("audio", { direction: "recvonly" });
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc);
      const answer = await post(callId, initData, "webrtc", { sdp: pc.localDescription.sdp });
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    } catch (err) {
      end(err.message || "webrtc_failed");
      throw err;
    }
    return {
      pc,
      async mute(muted) {
        for (const track of stream.getAudioTracks()) track.enabled = !muted;
        await post(callId, initData, "webrtc/mute", { muted: Boolean(muted) });
      },
      close() {
        end(null);
      },
    };
  }

  window.callbotWebRTC = { available: true, start };
})();
