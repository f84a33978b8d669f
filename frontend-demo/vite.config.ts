// The live storefront demo. `npm run build` writes dist/, which the server
// serves at /demo/. `npm run dev` proxies /graphql (HTTP and websocket) to a
// local server, by default http://127.0.0.1:8000 (override: SHOPGRAPH_URL).
import { defineConfig } from 'vite';

const target = process.env.SHOPGRAPH_URL ?? 'http://127.0.0.1:8000';

export default defineConfig({
  base: '/demo/',
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2020',
    sourcemap: false,
  },
  server: {
    host: '127.0.0.1',
    port: 5173,
    proxy: {
      '/graphql': { target, changeOrigin: true, ws: true },
      '/graphiql': { target, changeOrigin: true },
    },
  },
  preview: {
    proxy: {
      '/graphql': { target, changeOrigin: true, ws: true },
    },
  },
});
