// The callbot softphone: a Telegram Mini App. It shows the call, takes the microphone, and
// talks: on web numbers over the bot's talk WebSocket (PCM16 both ways, AudioWorklet), on Meta
// numbers through window.callbotWebRTC (webrtc.js).
"use strict";

const TEXTS = {
  en: {
    callee: "Calling", mic: "Your microphone", start: "Start audio", mute: "Mute",
    unmute: "Unmute", hangup: "Hang up",
    status: {
      PENDING: "Calling…", INITIATED: "Calling…", UNKNOWN: "Calling…", RINGING: "Ringing…",
      ACCEPTED: "Answered", COMPLETED: "Ended", MISSED: "Not answered", REJECTED: "Declined",
      FAILED: "Failed", NOT_STARTED: "Not placed", LOST: "Ended (unknown)",
    },
    error: {
      miniapp_no_init_data: "Open this page from the bot's Talk button in Telegram.",
      miniapp_bad_init_data: "Telegram's sign-in could not be checked. Open the Talk button again.",
      miniapp_init_data_expired: "This page was opened too long ago. Press the Talk button again.",
      miniapp_not_your_call: "Only the operator who placed this call (or an admin) may join it.",
      call_already_ended: "This call has ended.",
      no_call: "No call given. Open this page from a call's Talk button.",
      network: "The bot cannot be reached. Check the connection.",
      talk_failed: "The audio connection to the call failed.",
      meta_not_available: "Meta numbers: not available in this version of the softphone.",
    },
    mic_missing: "This Telegram client gives Mini Apps no microphone (Telegram Desktop on " +
      "Linux does not). Use Telegram on your phone, or web.telegram.org/a in a browser.",
    mic_denied: {
      android: "Telegram asks for the microphone on every call: allow it in Telegram's dialog " +
        "and then in Android's. If Android no longer asks: Settings → Apps → Telegram → " +
        "Permissions → Microphone → Allow.",
      ios: "Allow the microphone when asked. If it was denied: iOS Settings → Telegram → " +
        "Microphone.",
      tdesktop: "Telegram Desktop remembers a first \"Deny\" of the microphone and has no " +
        "way to reset it (Windows). Talk from Telegram on your phone or web.telegram.org/a.",
      macos: "Allow Telegram in System Settings → Privacy & Security → Microphone, then open " +
        "the Talk button again.",
      web: "Allow the microphone for web.telegram.org in your browser (the icon in the " +
        "address bar), then open the Talk button again.",
      other: "The microphone was denied. Allow it for Telegram, then open the Talk button again.",
    },
  },
  "pt-BR": {
    callee: "Ligando para", mic: "Seu microfone", start: "Iniciar áudio", mute: "Silenciar",
    unmute: "Ativar som", hangup: "Desligar",
    status: {
      PENDING: "Ligando…", INITIATED: "Ligando…", UNKNOWN: "Ligando…", RINGING: "Chamando…",
      ACCEPTED: "Atendida", COMPLETED: "Encerrada", MISSED: "Não atendida", REJECTED: "Recusada",
      FAILED: "Falhou", NOT_STARTED: "Não realizada", LOST: "Encerrada (desconhecido)",
    },
    error: {
      miniapp_no_init_data: "Abra esta página pelo botão Falar do bot no Telegram.",
      miniapp_bad_init_data: "Não foi possível verificar o login do Telegram. Abra o botão Falar de novo.",
      miniapp_init_data_expired: "Esta página foi aberta há muito tempo. Toque no botão Falar de novo.",
      miniapp_not_your_call: "Só o operador que fez esta ligação (ou um admin) pode entrar nela.",
      call_already_ended: "Esta ligação terminou.",
      no_call: "Nenhuma ligação indicada. Abra esta página pelo botão Falar de uma ligação.",
      network: "Não foi possível falar com o bot. Verifique a conexão.",
      talk_failed: "A conexão de áudio com a ligação falhou.",
      meta_not_available: "Números Meta: indisponível nesta versão do softphone.",
    },
    mic_missing: "Este cliente do Telegram não dá microfone aos Mini Apps (o Telegram Desktop " +
      "no Linux não dá). Use o Telegram no celular ou web.telegram.org/a no navegador.",
    mic_denied: {
      android: "O Telegram pede o microfone a cada ligação: permita no aviso do Telegram e " +
        "depois no do Android. Se o Android não perguntar mais: Configurações → Apps → " +
        "Telegram → Permissões → Microfone → Permitir.",
      ios: "Permita o microfone quando for pedido. Se foi negado: Ajustes do iOS → Telegram → " +
        "Microfone.",
      tdesktop: "O Telegram Desktop guarda a primeira recusa do microfone e não tem como " +
        "desfazê-la (Windows). Fale pelo Telegram no celular ou por web.telegram.org/a.",
      macos: "Permita o Telegram em Ajustes do Sistema → Privacidade e Segurança → Microfone e " +
        "abra o botão Falar de novo.",
      web: "Permita o microfone para web.telegram.org no navegador (o ícone na barra de " +
        "endereço) e abra o botão Falar de novo.",
      other: "O microfone foi negado. Permita-o para o Telegram e abra o botão Falar de novo.",
    },
  },
};

const tg = (window.Telegram && window.Telegram.WebApp) || null;
const initData = (tg && tg.initData) || "";
const unsafe = (tg && tg.initDataUnsafe) || {};
const params = new URLSearchParams(location.search);
const callId = params.get("call") || unsafe.start_param || "";
const lang = /^pt/i.test((unsafe.user && unsafe.user.language_code) || "") ? "pt-BR" : "en";
const T = TEXTS[lang];
const $ = (id) => document.getElementById(id);

const state = {
  call: null, stream: null, ctx: null, capture: null, playback: null, analyser: null,
  socket: null, muted: false, ended: false, talking: false, tries: 0, remoteLoudAt: null,
};
// For tests and for the curious: what the page hears, measured where it is played.
window.callbot = {
  state,
  remoteLevel() {
    if (!state.analyser) return 0;
    const data = new Float32Array(state.analyser.fftSize);
    state.analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const x of data) sum += x * x;
    return Math.sqrt(sum / data.length);
  },
};

function applyTheme() {
  const theme = (tg && tg.themeParams) || {};
  const root = document.documentElement.style;
  const pairs = {
    "--bg": theme.bg_color, "--text": theme.text_color, "--hint": theme.hint_color,
    "--card": theme.secondary_bg_color, "--accent": theme.button_color,
    "--accent-text": theme.button_text_color, "--danger": theme.destructive_text_color,
  };
  for (const [name, value] of Object.entries(pairs)) {
    if (value) root.setProperty(name, value); else root.removeProperty(name);
  }
  document.documentElement.dataset.theme = (tg && tg.colorScheme) || "light";
}

function translate() {
  document.documentElement.lang = lang;
  for (const node of document.querySelectorAll("[data-t]")) node.textContent = T[node.dataset.t];
}

function notice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = !text;
}

function failed(code) {
  notice(T.error[code] || T.error.talk_failed);
}

async function api(method, path) {
  let response;
  try {
    response = await fetch(`api/calls/${encodeURIComponent(callId)}${path}`, {
      method, headers: { Authorization: `tma ${initData}` },
    });
  } catch (err) {
    throw Object.assign(new Error("network"), { code: "network" });
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw Object.assign(new Error(body.error), { code: body.error, status: response.status });
  return body;
}

function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function show(call) {
  state.call = call;
  $("callee").textContent = call.callee_masked || "—";
  $("status").textContent = T.status[call.status] || call.status;
  const answered = Boolean(call.connected_at);
  $("duration").hidden = !answered;
  if (answered) {
    const end = call.ended_at ? Date.parse(call.ended_at) : Date.now();
    const seconds = call.ended && call.duration_seconds != null
      ? call.duration_seconds : (end - Date.parse(call.connected_at)) / 1000;
    $("duration").textContent = clock(seconds);
  }
  if (call.ended) finish();
  else if (call.status === "ACCEPTED") talk();
}

async function follow() {
  while (!state.ended) {
    try {
      show(await api("GET", ""));
    } catch (err) {
      failed(err.code);
      if (err.status === 401 || err.status === 403) return finish();
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function microphone() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    notice(T.mic_missing);
    return null;
  }
  try {
    // audio alone, once per call: Android's Telegram grants only single-resource requests
    return await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    const platform = (tg && tg.platform) || "";
    const key = platform === "weba" || platform === "webk" || platform === "web" ? "web"
      : T.mic_denied[platform] ? platform : "other";
    notice(T.mic_denied[key]);
    return null;
  }
}

async function audio(rate) {
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("worklet.js");
  const capture = new AudioWorkletNode(ctx, "callbot-capture", {
    numberOfOutputs: 1, processorOptions: { rate },
  });
  const playback = new AudioWorkletNode(ctx, "callbot-playback", {
    numberOfInputs: 0, outputChannelCount: [1], processorOptions: { rate },
  });
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  const silent = ctx.createGain();
  silent.gain.value = 0;
  ctx.createMediaStreamSource(state.stream).connect(capture);
  capture.connect(silent).connect(ctx.destination);
  playback.connect(analyser).connect(ctx.destination);
  capture.port.onmessage = (event) => {
    $("level").style.width = `${Math.min(100, Math.round(event.data.level * 400))}%`;
    if (state.socket && state.socket.readyState === WebSocket.OPEN) state.socket.send(event.data.pcm);
  };
  capture.port.postMessage({ muted: state.muted });
  Object.assign(state, { ctx, capture, playback, analyser });
  if (ctx.state !== "running") {
    const start = $("start");
    start.hidden = false;
    start.onclick = async () => { await ctx.resume(); start.hidden = true; };
  }
}

function talk() {
  if (state.talking || state.ended || !state.stream) return;
  state.talking = true;
  if (state.call.kind === "webrtc") return talkWebRTC();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const base = location.pathname.replace(/[^/]*$/, "");
  const socket = new WebSocket(`${scheme}//${location.host}${base}api/calls/${encodeURIComponent(callId)}/talk`);
  socket.binaryType = "arraybuffer";
  state.socket = socket;
  socket.onopen = () => socket.send(JSON.stringify({ initData }));
  socket.onmessage = async (event) => {
    if (typeof event.data !== "string") {
      if (state.playback) state.playback.port.postMessage(event.data, [event.data]);
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "ready") {
      state.tries = 0;
      if (!state.ctx) await audio(message.rate);
    } else if (message.type === "error") {
      failed(message.error);
    }
  };
  socket.onclose = (event) => {
    state.socket = null;
    state.talking = false;
    const refused = event.code === 4401 || event.code === 4403 || event.code === 4000;
    if (!state.ended && !refused && state.tries++ < 5) setTimeout(talk, 1000);
  };
}

function talkWebRTC() {
  const webrtc = window.callbotWebRTC;
  const onEnded = (reason) => { if (reason) failed(reason); };
  Promise.resolve(webrtc.start({
    callId, initData, stream: state.stream, iceServers: state.call.ice_servers,
    onRemoteStream(remote) {
      const ctx = new AudioContext();
      const analyser = ctx.createAnalyser();
      analyser.fftSize = 1024;
      ctx.createMediaStreamSource(remote).connect(analyser).connect(ctx.destination);
      Object.assign(state, { ctx, analyser });
    },
    onEnded,
  })).catch((err) => failed(err.message));
}

function setMuted(muted) {
  state.muted = muted;
  for (const track of state.stream ? state.stream.getAudioTracks() : []) track.enabled = !muted;
  if (state.capture) state.capture.port.postMessage({ muted });
  const button = $("mute");
  button.textContent = muted ? T.unmute : T.mute;
  button.classList.toggle("on", muted);
}

async function hangUp() {
  $("hangup").disabled = true;
  try {
    show(await api("POST", "/hangup"));
  } catch (err) {
    failed(err.code);
  }
  finish();
}

function finish() {
  if (state.ended) return;
  state.ended = true;
  if (state.socket) state.socket.close(1000);
  if (state.stream) for (const track of state.stream.getTracks()) track.stop();
  if (state.ctx) state.ctx.close();
  $("mute").disabled = true;
  $("hangup").disabled = true;
  $("level").style.width = "0";
}

async function main() {
  if (tg) {
    tg.ready();
    tg.expand();
    if (tg.disableVerticalSwipes) tg.disableVerticalSwipes(); // a swipe must not end a call
    tg.onEvent("themeChanged", applyTheme);
  }
  applyTheme();
  translate();
  $("mute").onclick = () => setMuted(!state.muted);
  $("hangup").onclick = hangUp;
  if (!callId) return notice(T.error.no_call);
  let call;
  try {
    call = await api("GET", "");
  } catch (err) {
    return failed(err.code);
  }
  state.call = call;
  $("hangup").disabled = call.ended;
  show(call);
  if (call.ended) return;
  state.stream = await microphone();
  if (state.stream) $("mute").disabled = false;
  follow();
}

main();
